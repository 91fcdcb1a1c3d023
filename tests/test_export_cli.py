"""granet-export: success paths, exit codes, and one clear error line for every bad input."""

import io
import json
import os
import random
import pickle
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import granet_fx as gf
from granet_fx.export import cli
from granet_fx.export.onnx_export import run_onnxruntime

from helpers import MLP, SmallCNN, granet_export
from test_archive import Touch, rewrite
from test_fold import trained
from test_onnx_export import sparse_tensors


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = trained(SmallCNN())
    model.eval()
    folder = tmp_path_factory.mktemp("cli")
    x = torch.randn(1, 1, 12)
    gf.save(model, folder / "model.pt2", example_inputs=(x,))
    return model, x, folder / "model.pt2"


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory):
    """A state_dict of a sparsified MLP whose masked-out weights are NOT zero: the tool must apply the masks."""
    torch.manual_seed(0)
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="static", final_sparsity=0.8, total_steps=1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1)
    path = tmp_path_factory.mktemp("ckpt") / "mlp.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


TESTS = os.path.dirname(os.path.abspath(__file__))


def run(capsys, *argv):
    """granet-export as a user runs it: a fresh interpreter (the tests folder importable, for --model helpers:MLP)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "granet_fx.export.cli", *map(str, argv)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def test_archive_to_onnx(archive, tmp_path, capsys):
    model, x, path = archive
    out_file = tmp_path / "model.onnx"
    code, out, err = run(capsys, path, "-o", out_file)
    assert code == 0, err
    onnx_model = onnx.load(out_file)
    onnx.checker.check_model(onnx_model, full_check=True)
    assert "conv2.weight" in sparse_tensors(onnx_model)
    y = run_onnxruntime(out_file.read_bytes(), [x])[0]
    assert np.allclose(y, model(x).detach().numpy(), rtol=0, atol=1e-5)
    # summary: the file sizes, the densities, the honest note; progress goes to stderr
    assert "dense weights" in out and f"{out_file.stat().st_size:,}" in out
    assert "conv2.weight" in out and "global density" in out and "max abs error" in out
    assert "densifies sparse weights" in out
    assert "exporting to ONNX" in err and "onnxruntime" in err


def test_dense_initializers_and_dynamic_batch(archive, tmp_path, capsys):
    model, _, path = archive
    out_file = tmp_path / "dense.onnx"
    code, out, err = run(capsys, path, "-o", out_file, "--dense-initializers", "--dynamic-batch")
    assert code == 0, err
    onnx_model = onnx.load(out_file)
    assert not sparse_tensors(onnx_model)
    x4 = torch.randn(4, 1, 12)
    y = run_onnxruntime(out_file.read_bytes(), [x4])[0]
    assert np.allclose(y, model(x4).detach().numpy(), rtol=0, atol=1e-5)


def test_state_dict_with_factory_applies_the_masks(mlp_checkpoint, tmp_path, capsys):
    model, path = mlp_checkpoint
    out_file = tmp_path / "mlp.onnx"
    code, out, err = run(capsys, path, "--model", "helpers:MLP", "--input-shape", "2,20", "-o", out_file,
                         "--sparse-layout", "initializer", "--opset", "18")
    assert code == 0, err
    onnx_model = onnx.load(out_file)
    assert onnx_model.opset_import[0].version == 18 and onnx_model.graph.sparse_initializer
    x = torch.randn(2, 20)
    y = run_onnxruntime(out_file.read_bytes(), [x])[0]
    assert np.allclose(y, model(x).detach().numpy(), rtol=0, atol=1e-5)  # the masked model's outputs


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.slow
def test_pickled_module_with_trust(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(Tiny(), path)
    code, out, err = run(capsys, path, "--input-shape", "1,3", "-o", tmp_path / "a.onnx", "--trust-pickle")
    assert code == 0, err
    x = torch.randn(1, 3)
    y = run_onnxruntime((tmp_path / "a.onnx").read_bytes(), [x])[0]
    assert np.allclose(y, torch.load(path, weights_only=False)(x).detach().numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_opset_the_exporter_cannot_write(archive, tmp_path, capsys):
    *_, path = archive
    code, out, err = run(capsys, path, "-o", tmp_path / "a.onnx", "--opset", "5")
    assert code == 2 and "opset 5" in err and len(err.strip().splitlines()[-1:]) == 1
    assert not (tmp_path / "a.onnx").exists()


def test_reference_mismatch_fails_and_writes_nothing(archive, tmp_path, capsys):
    _, _, path = archive
    data = path.read_bytes()
    import zipfile
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        name = next(n for n in z.namelist() if n.endswith("extra/granet_fx.json"))
        metadata = json.loads(z.read(name))
    reference = gf.export.archive.tensor_from_json(metadata["reference_outputs"][0]) + 1.0
    metadata["reference_outputs"] = [gf.export.archive.tensor_to_json(reference)]
    wrong = tmp_path / "wrong.pt2"
    wrong.write_bytes(rewrite(data, {"extra/granet_fx.json": json.dumps(metadata).encode()}))
    out_file = tmp_path / "out.onnx"
    out_file.write_bytes(b"old")
    code, out, err = run(capsys, wrong, "-o", out_file)
    assert code == 1 and "differ from the reference" in err
    assert "max abs error 1" in out  # it prints the error it measured: 1.0
    assert out_file.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["out.onnx", "wrong.pt2"]


def unwritable_folder(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing; /sys refuses new files
        return "/sys" if os.path.isdir("/sys") else None
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return str(folder)


BAD = {
    "missing file": lambda t, a: ([t / "nope.pt2"], "no such file"),
    "empty file": lambda t, a: ([write(t / "empty.pt2", b"")], "is empty"),
    "random bytes": lambda t, a: ([write(t / "random.pt2", random.Random(0).randbytes(3000))], "not a granet_fx archive"),
    "truncated archive": lambda t, a: ([write(t / "cut.pt2", a.read_bytes()[:5000])], "not a granet_fx archive"),
    "onnx file": lambda t, a: ([write(t / "m.onnx", onnx.helper.make_model(
        onnx.helper.make_graph([], "g", [], [])).SerializeToString())], "not a granet_fx archive"),
    "pickle that runs code": lambda t, a: ([write(t / "evil.pt", pickle.dumps(Touch(t / "code-ran"))),
                                            "--input-shape", "1,3"], "trust-pickle"),
    "torch.save of code": lambda t, a: ([save(t / "evil2.pt", Touch(t / "code-ran")), "--input-shape", "1,3"],
                                        "trust-pickle"),
    "input shape not numbers": lambda t, a: ([save(t / "sd.pt", MLP().state_dict()), "--model", "helpers:MLP",
                                              "--input-shape", "2,x"], "positive integers"),
    "input shape wrong": lambda t, a: ([save(t / "sd.pt", MLP().state_dict()), "--model", "helpers:MLP",
                                        "--input-shape", "2,7"], "does not take input shape 2,7"),
    "no input shape": lambda t, a: ([save(t / "sd.pt", MLP().state_dict()), "--model", "helpers:MLP"],
                                    "--input-shape is required"),
    "state_dict of another model": lambda t, a: ([save(t / "sd.pt", Tiny().state_dict()), "--model", "helpers:MLP",
                                                  "--input-shape", "2,20"], "does not fit"),
    "mask that does not fit": lambda t, a: ([save(t / "sd.pt", {**MLP().state_dict(),
                                                                 "fc1.weight_mask": torch.ones(3, 3, dtype=torch.bool)}),
                                             "--model", "helpers:MLP", "--input-shape", "2,20"],
                                            "fc1.weight_mask does not fit fc1.weight"),
    "bad factory": lambda t, a: ([save(t / "sd.pt", MLP().state_dict()), "--model", "helpers.MLP",
                                  "--input-shape", "2,20"], "package.module:factory"),
    "archive with --input-shape": lambda t, a: ([a, "--input-shape", "1,1,12"], "checkpoints only"),
    "whole pickled module": lambda t, a: ([save(t / "whole.pt", Tiny()), "--input-shape", "1,3"], "trust-pickle"),
    "unknown option": lambda t, a: ([a, "--fast"], "unrecognized arguments"),
}


def write(path, data):
    path.write_bytes(data)
    return path


def save(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2(archive, tmp_path, capsys, case):
    *_, path = archive
    args, words = BAD[case](tmp_path, path)
    out_file = tmp_path / "out.onnx"
    out_file.write_bytes(b"old")
    before = set(os.listdir(tmp_path))
    code, out, err = run(capsys, *args, "-o", out_file)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("granet-export: error: ") and words in lines[0]
    assert out == ""
    assert out_file.read_bytes() == b"old" and set(os.listdir(tmp_path)) == before
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("where", ["missing folder", "a file as folder", "unwritable folder"])
def test_bad_output_one_line_exit_2(archive, tmp_path, capsys, where):
    *_, path = archive
    (tmp_path / "file").write_bytes(b"x")
    folder = {"missing folder": str(tmp_path / "no" / "such"), "a file as folder": str(tmp_path / "file"),
              "unwritable folder": unwritable_folder(tmp_path)}[where]
    if folder is None:
        pytest.skip("no unwritable folder on this machine")
    code, out, err = run(capsys, path, "-o", os.path.join(folder, "out.onnx"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("granet-export: error: cannot write") and "Traceback" not in err
    assert not os.path.exists(os.path.join(folder, "out.onnx"))


def test_console_script_subprocess(tmp_path):
    """The real process: exit code 2 and a single stderr line, without a traceback."""
    result = subprocess.run([sys.executable, "-m", "granet_fx.export.cli", str(tmp_path / "nope.pt2"),
                             "-o", str(tmp_path / "out.onnx")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"granet-export: error: {tmp_path / 'nope.pt2'}: no such file"]
    assert result.stdout == ""


@pytest.mark.slow
def test_console_script_end_to_end(archive, tmp_path):
    *_, path = archive
    result = granet_export(path, tmp_path / "out.onnx")
    assert "wrote" in result.stdout and (tmp_path / "out.onnx").exists()
    exe = os.path.join(os.path.dirname(sys.executable), "granet-export")
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300).stdout
    assert "RUNS CODE FROM THE FILE" in help_text


def test_compact_removes_channels_and_keeps_parity(tmp_path, capsys):
    torch.manual_seed(0)
    config = gf.GraNetConfig(granularity="channel", final_sparsity=0.5, total_steps=4, prune_start=1, prune_end=1,
                             update_every=1)
    x = torch.randn(1, 1, 12)
    model = gf.sparsify(SmallCNN(), config, example_inputs=(x,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    granet = gf.GraNet(model, opt)
    model(torch.randn(4, 1, 12)).sum().backward()
    opt.step()
    granet.step()  # one-shot channel pruning to 50%
    model.eval()
    saved = tmp_path / "m.pt2"
    gf.save(model, saved, example_inputs=(x,))
    plain, small = tmp_path / "plain.onnx", tmp_path / "small.onnx"
    assert run(capsys, saved, "-o", plain)[0] == 0
    code, out, _ = run(capsys, saved, "-o", small, "--compact")
    assert code == 0 and "compaction: removed" in out and "max abs error" in out
    # fewer conv output channels in the compacted file, same outputs in onnxruntime
    def conv_rows(path):
        m = onnx.load(str(path))
        return sorted(numpy_helper_dims(m, n.input[1]) for n in m.graph.node if n.op_type == "Conv")
    assert sum(conv_rows(small)) < sum(conv_rows(plain))
    y = run_onnxruntime(small.read_bytes(), [x])[0]
    assert np.allclose(y, model(x).detach().numpy(), atol=1e-5)


def numpy_helper_dims(model, name):
    """The first dimension (output channels) of a weight, dense or stored sparse."""
    for t in model.graph.initializer:
        if t.name == name:
            return t.dims[0]
    return sparse_tensors(model)[name].dims[0]


def test_the_output_may_not_be_the_input(archive, tmp_path, capsys):
    *_, path = archive
    copy = tmp_path / "model.pt2"
    copy.write_bytes(path.read_bytes())
    code, out, err = run(capsys, copy, "-o", copy)
    assert code == 2 and "is the input file" in err and len(err.strip().splitlines()) == 1
    assert copy.read_bytes() == path.read_bytes() and os.listdir(tmp_path) == ["model.pt2"]


def test_onnx_outputs_are_named_after_the_model_outputs(tmp_path, capsys):
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = self.fc(x)
            return {"scores": y, "extra": (y.relu(), y.sum(-1))}

    model = TwoHeads().eval()
    x = torch.randn(2, 4)
    gf.save(model, tmp_path / "m.pt2", example_inputs=(x,))
    code, out, err = run(capsys, tmp_path / "m.pt2", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    names = [o.name for o in onnx.load(tmp_path / "m.onnx").graph.output]
    assert names == ["scores", "extra.0", "extra.1"]     # torch's pytree order of a dict: insertion order
    ys = run_onnxruntime((tmp_path / "m.onnx").read_bytes(), [x])
    with torch.no_grad():
        expected = model(x)
    for y, e in zip(ys, [expected["scores"], expected["extra"][0], expected["extra"][1]]):
        assert np.allclose(y, e.numpy(), rtol=0, atol=1e-6)


def test_int8_quantization_with_a_calibration_set(archive, tmp_path, capsys):
    model, _, path = archive
    torch.manual_seed(1)
    calibration = torch.randn(64, 1, 12)
    np.savez(tmp_path / "calib.npz", calibration.numpy())
    out_file = tmp_path / "int8.onnx"
    code, out, err = run(capsys, path, "-o", out_file, "--quantize", "int8", "--calibration", tmp_path / "calib.npz",
                         "--min-agreement", "0.5", "--dynamic-batch")
    assert code == 0, err
    int8 = onnx.load(out_file)
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the agreement it reports, computed here independently: argmax of int8 vs the float model in torch
    test = torch.randn(200, 1, 12)
    y8 = run_onnxruntime(out_file.read_bytes(), [test])[0]
    with torch.no_grad():
        y = model(test).numpy()
    assert np.mean(y8.argmax(-1) == y.argmax(-1)) >= 0.8
    assert np.max(np.abs(y8 - y)) < 0.25 * np.max(np.abs(y))        # int8 is close, not exact
    assert "top-1 agreement" in out and "64 calibration sample" in out


def test_int8_agreement_below_the_minimum_writes_nothing(archive, tmp_path, capsys):
    *_, path = archive
    code, out, err = run(capsys, path, "-o", tmp_path / "int8.onnx", "--quantize", "int8", "--min-agreement", "1.01")
    assert code == 2 and "--min-agreement" in err
    np.savez(tmp_path / "two.npz", np.zeros((4, 1, 12), np.float32), np.zeros((4, 3), np.float32))
    code, out, err = run(capsys, path, "-o", tmp_path / "int8.onnx", "--quantize", "int8",
                         "--calibration", tmp_path / "two.npz")
    assert code == 2 and "holds 2 arrays; the model takes 1" in err and len(err.strip().splitlines()[-1:]) == 1
    assert not (tmp_path / "int8.onnx").exists()


class TwoConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(32, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


@pytest.mark.parametrize("multiple, note", [
    (1, "2 convolutions kept a channel count that is not a multiple of 8 (13, 6)"),
    pytest.param(8, None, marks=pytest.mark.slow)])
def test_compact_names_conv_widths_that_run_slow(tmp_path, multiple, note):
    """Each group keeps round(0.4 x its size) channels (scope="layer"): 13 of 32 and 6 of 16, or with
    channel_multiple=8 the nearest multiples, 16 and 8, which need no note."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    config = gf.GraNetConfig(method="gmp", granularity="channel", scope="layer", final_sparsity=0.6, total_steps=1,
                             prune_end=1, update_every=1, channel_multiple=multiple)
    model = gf.sparsify(TwoConvs(), config, example_inputs=(x,))
    gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.0)).step()
    gf.save(model.eval(), tmp_path / "m.pt", example_inputs=(x,))
    run = granet_export(tmp_path / "m.pt", tmp_path / "m.onnx", "--compact", timeout=300)
    assert "Warning" not in run.stderr, run.stderr      # torch's own deprecation warnings stay inside
    if note is None:
        assert "not a multiple of 8" not in run.stdout
    else:
        assert note in run.stdout and "channel_multiple='measured'" in run.stdout
