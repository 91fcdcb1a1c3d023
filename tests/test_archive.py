"""save/load: a folded model in a torch.export archive that loads without running code from the file."""

import hashlib
import io
import json
import os
import pathlib
import pickle
import zipfile

import pytest
import torch

import granet_fx as gf

from helpers import SmallCNN
from test_fold import trained


class Touch:
    """Unpickling this creates a marker file: the proof that code from a file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


METADATA = "extra/granet_fx.json"


def rewrite(data: bytes, changes: dict, *, redigest: bool = True) -> bytes:
    """A copy of zip ``data`` with entries replaced, added (name -> bytes) or removed (name -> None).

    ``redigest``: also update the metadata's SHA-256 list, as an attacker would,
    so that the checks behind the digests are the ones tested.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        names = src.namelist()
        root = names[0].split("/", 1)[0]
        entries = {name[len(root) + 1:]: src.read(name) for name in names}
    for name, value in changes.items():
        if value is None:
            entries.pop(name, None)
        else:
            entries[name] = value
    if redigest and METADATA in entries and METADATA not in changes:
        metadata = json.loads(entries[METADATA])
        metadata["entries"] = {n: hashlib.sha256(v).hexdigest() for n, v in entries.items() if n != METADATA}
        entries[METADATA] = json.dumps(metadata).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, value in entries.items():
            dst.writestr(f"{root}/{name}", value)
    return out.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model, granet = trained(SmallCNN())
    model.eval()
    path = tmp_path_factory.mktemp("archive") / "model.pt2"
    x = torch.randn(1, 1, 12)
    gf.save(model, path, example_inputs=(x,))
    return model, granet, x, path


def test_round_trip(saved):
    model, granet, x, path = saved
    loaded = gf.load(path)
    assert loaded.config == gf.sparse_info(model).config and loaded.kind == "sparse"
    assert torch.equal(loaded.example_inputs[0], x)
    with torch.no_grad():
        expected = model(x)
    assert len(loaded.reference_outputs) == 1 and torch.equal(loaded.reference_outputs[0], expected)
    assert loaded.output_names == ["output"]
    (out,) = loaded.module()(x)                       # outputs are stored flat: a tuple of tensors
    assert torch.equal(out, expected)
    # densities: the masks' counts; MACs of a conv1d: output elements x in_channels x kernel
    masks = granet.masks()
    layers = {l.name: l for l in loaded.layers}
    for name, mask in masks.items():
        assert layers[name].active == int(mask.sum()) and layers[name].numel == mask.numel()
    assert layers["conv1.weight"].macs == 8 * 12 * 1 * 5
    assert layers["conv2.weight"].macs == 16 * 12 * 8 * 3
    assert layers["fc.weight"].macs == 4 * 16
    # the batch is dynamic: other batch sizes give what the model gives
    assert loaded.dynamic_batch
    x3 = torch.randn(3, 1, 12)
    assert torch.allclose(loaded.module()(x3)[0], model(x3), rtol=0, atol=1e-6)


def test_archive_holds_no_pickle(saved):
    *_, path = saved
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            data = z.read(name)
            assert not data.startswith(b"\x80"), f"{name} looks like a pickle"
            assert b"data.pkl" not in name.encode()
        metadata = json.loads(z.read(next(n for n in z.namelist() if n.endswith("extra/granet_fx.json"))))
    assert metadata["format"] == "granet_fx.archive" and metadata["config"]["final_sparsity"] == 0.8


def test_save_is_atomic(saved, tmp_path):
    model, _, x, path = saved
    target = tmp_path / "model.pt2"
    target.write_bytes(b"precious")
    with pytest.raises(TypeError, match="example_inputs"):
        gf.save(model, target, example_inputs=("not a tensor",))
    assert target.read_bytes() == b"precious"
    gf.save(model, target, example_inputs=(x,))
    assert gf.load(target).example_inputs[0].shape == x.shape
    assert sorted(os.listdir(tmp_path)) == ["model.pt2"]  # no temporary file left


def test_code_in_a_crafted_archive_never_runs(saved, tmp_path):
    *_, path = saved
    marker = tmp_path / "code-ran"
    data = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        root = z.namelist()[0].split("/", 1)[0]
        config = json.loads(z.read(f"{root}/data/weights/model_weights_config.json"))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    evil = rewrite(data, {
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
        "data/weights/" + first["path_name"]: pickle.dumps(Touch(marker)),
    })
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(evil)

    with pytest.raises(gf.ArchiveError, match="is pickled"):
        gf.load(crafted)
    assert not marker.exists()
    # The same file through torch.export.load runs the code: the check above is what stops it.
    with pytest.raises(Exception):
        torch.export.load(crafted)
    assert marker.exists()


def test_unknown_entries_are_refused(saved, tmp_path):
    *_, path = saved
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(rewrite(path.read_bytes(), {"data/sample_inputs/model.pt": pickle.dumps(Touch(marker))}))
    with pytest.raises(gf.ArchiveError, match="pickled sample inputs"):
        gf.load(crafted)
    crafted.write_bytes(rewrite(path.read_bytes(), {"data/aotinductor/model/model.so": b"\x7fELF"}))
    with pytest.raises(gf.ArchiveError, match="never writes"):
        gf.load(crafted)
    assert not marker.exists()


def bad_file(kind: str, archive: bytes):
    """A file that load must refuse (None: no file), and the words its error must contain."""
    if kind == "torch_export_without_metadata":
        plain = io.BytesIO()
        torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)), plain)
        return plain.getvalue(), "without granet_fx.json"
    if kind == "state_dict":
        state = io.BytesIO()
        torch.save({"w": torch.ones(2)}, state)
        return state.getvalue(), "without granet_fx.json"
    metadata = {"other_format": {"format": "other"}, "newer_version": {"format": "granet_fx.archive", "version": 99}}
    if kind in metadata:
        words = "not granet_fx metadata" if kind == "other_format" else "version 99"
        return rewrite(archive, {METADATA: json.dumps(metadata[kind]).encode()}), words
    return {
        "missing": (None, "no such file"),
        "empty": (b"", "empty"),
        "random": (os.urandom(4096), "not a complete zip"),
        "truncated": (archive[: len(archive) // 2], "not a complete zip"),
        "flipped_byte": (archive[:200] + bytes([archive[200] ^ 0xFF]) + archive[201:], "damaged"),
    }[kind]


@pytest.mark.parametrize("kind", ["missing", "empty", "random", "truncated", "torch_export_without_metadata",
                                  "state_dict", "other_format", "newer_version", "flipped_byte"])
def test_bad_files_get_one_clear_error(saved, tmp_path, kind):
    *_, path = saved
    data, words = bad_file(kind, path.read_bytes())
    target = tmp_path / "bad.pt2"
    if data is not None:
        target.write_bytes(data)
    with pytest.raises(gf.ArchiveError, match=words) as info:
        gf.load(target)
    assert str(target) in str(info.value) and "\n" not in str(info.value)


# Issue: a saved file is self-contained, whatever module it holds ------------------------------------
FRESH_LOAD = """
import sys, torch, granet_fx as gf
saved = gf.load(sys.argv[1])
assert "transformers" not in sys.modules, "loading imported the model's package"
outputs = saved.module()(*saved.example_inputs)
assert isinstance(outputs, tuple) and len(outputs) == len(saved.reference_outputs)
print(saved.kind, ",".join(saved.output_names),
      max(float((a - b).abs().max()) for a, b in zip(outputs, saved.reference_outputs)))
"""


def test_a_transformers_model_loads_in_a_process_that_never_imported_transformers(tmp_path):
    import subprocess
    import sys
    import warnings

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = gf.sparsify(transformers.GPT2LMHeadModel(config), gf.GraNetConfig(final_sparsity=0.5, total_steps=4))
    ids = torch.randint(0, 50, (2, 6))
    path = tmp_path / "gpt2.pt2"
    gf.save(model, path, example_inputs=(ids,))
    result = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    kind, names, error = result.stdout.split()
    assert kind == "sparse" and names == "logits"     # CausalLMOutput's key, stored flat
    assert float(error) == 0.0
    with torch.no_grad():                               # the stored reference is the model's own output
        assert torch.equal(gf.load(path).reference_outputs[0], model.eval()(ids).logits)


def test_dense_and_compacted_models_are_saved_and_say_so(tmp_path):
    torch.manual_seed(0)
    dense = SmallCNN().eval()
    with torch.no_grad():
        dense.conv2.weight[:, :, 0] = 0.0               # 1/3 of conv2's weights are zero
    x = torch.randn(2, 1, 12)
    gf.save(dense, tmp_path / "dense.pt2", example_inputs=(x,))
    saved = gf.load(tmp_path / "dense.pt2")
    assert saved.kind == "dense" and saved.config is None
    conv2 = next(l for l in saved.layers if l.name == "conv2.weight")
    assert conv2.numel == 16 * 8 * 3 and conv2.active == 16 * 8 * 2   # counted by nonzeros
    with torch.no_grad():
        assert torch.equal(saved.module()(x)[0], dense(x))

    sparse = gf.sparsify(SmallCNN(), gf.GraNetConfig(granularity="channel", final_sparsity=0.5, total_steps=10,
                                                     update_every=5), example_inputs=(x,))
    granet = gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1))
    for _ in range(10):
        sparse(x).sum().backward()
        granet.step()
    small = gf.compact(sparse, (x,))
    gf.save(small, tmp_path / "small.pt2", example_inputs=(x,))
    saved = gf.load(tmp_path / "small.pt2")
    assert saved.kind == "compacted" and saved.config is None
    with torch.no_grad():
        assert torch.allclose(saved.module()(x)[0], sparse.eval()(x), rtol=0, atol=1e-5)


def test_an_archive_of_the_old_format_asks_to_be_saved_again(saved, tmp_path):
    *_, path = saved
    with zipfile.ZipFile(path) as z:
        metadata = json.loads(z.read(next(n for n in z.namelist() if n.endswith(METADATA))))
    metadata["version"] = 1
    old = tmp_path / "old.pt2"
    old.write_bytes(rewrite(path.read_bytes(), {METADATA: json.dumps(metadata).encode()}))
    with pytest.raises(gf.ArchiveError, match="older granet_fx.*re-save"):
        gf.load(old)


@torch.library.custom_op("granet_fx_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class UsesCustomOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return torch.ops.granet_fx_test.twice(self.fc(x))


def test_a_custom_operator_is_refused_at_save_by_name(tmp_path):
    target = tmp_path / "model.pt2"
    with pytest.raises(ValueError, match="granet_fx_test::twice"):
        gf.save(UsesCustomOp(), target, example_inputs=(torch.randn(2, 3),))
    assert not target.exists() and not os.listdir(tmp_path)


class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) / 0.0 * 0.0                   # NaN everywhere


def test_outputs_that_are_not_finite_are_refused_at_save(tmp_path):
    with pytest.raises(ValueError, match="not all finite"):
        gf.save(Broken(), tmp_path / "model.pt2", example_inputs=(torch.randn(2, 3),))
    assert not os.listdir(tmp_path)


class SequenceFirstEncoder(torch.nn.Module):
    """torch's transformer encoder in its default layout, (sequence, batch, channels): its attention reads a
    strided input, on which F.linear picks its kernel by whether the weight requires grad, even under no_grad."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 32)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.out(self.enc(self.inp(x).transpose(0, 1)).mean(0))


@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
def test_a_sequence_first_transformer_is_saved(granularity, tmp_path):
    """Its folded copy and the masked model agree to the bit when both run as in training (a masked weight
    then requires grad, like its folded copy), so save takes it, and the stored reference is the masked
    model's output."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 8)
    config = gf.GraNetConfig(method="gmp", granularity=granularity, final_sparsity=0.5, total_steps=1, prune_end=1,
                             update_every=1)
    sparse = gf.sparsify(SequenceFirstEncoder().eval(), config, example_inputs=(x,))
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    gf.save(sparse.eval(), tmp_path / "m.pt", example_inputs=(x,))
    (reference,) = gf.load(tmp_path / "m.pt").reference_outputs
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(reference), sparse(x), atol=1e-6, rtol=1e-5)
