"""granet-bench: FLOPs against hand counts, the report's numbers, and clear errors for bad input."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from granet_fx.export import bench


def tiny_model(path, channels=4, batch="N"):
    """Conv 3x3 (3 -> channels, pad 1) on 8x8, flatten, MatMul to 5, Gemm (transB) to 2."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((channels * 64, 5)).astype(np.float32), "m"),
        numpy_helper.from_array(rng.standard_normal((2, 5)).astype(np.float32), "g"),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "m"], ["h"]),
        helper.make_node("Gemm", ["h", "g"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)


def hand_macs(channels):
    # conv: 8*8 outputs * channels, 3*3*3 each; matmul: 5 outputs, channels*64 each; gemm: 2 outputs, 5 each
    return 64 * channels * 27 + 5 * channels * 64 + 2 * 5


def test_flops_against_a_hand_count(tmp_path):
    model = onnx.load(tiny_model(tmp_path / "a.onnx", channels=4))
    assert bench.count_macs(model) == hand_macs(4) == 8202
    assert bench.load(str(tmp_path / "a.onnx")).flops == 2 * 8202


def test_flops_where_shape_inference_loses_the_batch(tmp_path):
    """HF GPT-2's exported attention mask leaves ONNX shape inference without the batch after the first
    attention: those shapes come from one onnxruntime run instead, and the count is still the hand count."""
    transformers = pytest.importorskip("transformers")
    import sys

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from speedup import export

    config = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=16,
                                     num_labels=10, pad_token_id=0, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    export(transformers.GPT2ForSequenceClassification(config).eval(), torch.randint(1, 100, (1, 16)),
           str(tmp_path / "gpt2.onnx"))
    # 16 tokens; per layer: c_attn 64 -> 192, q k^T and attention x v (4 heads of 16, 16 x 16), c_proj 64 -> 64,
    # MLP 64 -> 128 -> 64; then the score head 64 -> 10
    layer = 16 * 64 * 192 + 2 * 4 * 16 * 16 * 16 + 16 * 64 * 64 + 16 * 64 * 128 + 16 * 128 * 64
    assert bench.load(str(tmp_path / "gpt2.onnx")).flops == 2 * (2 * layer + 16 * 64 * 10)


def test_side_by_side_run_table_and_json(tmp_path, capsys):
    small = tiny_model(tmp_path / "small.onnx", channels=2)
    big = tiny_model(tmp_path / "big.onnx", channels=8)
    out = tmp_path / "result.json"
    rc = bench.main([small, "--baseline", big, "--batch", "1,3", "--threads", "1", "--warmup", "1", "--runs", "4",
                     "--json", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "1 thread(s)" in captured.out and "speedup" in captured.out and "logical CPUs" in captured.out
    assert "[" in captured.err and "runs" in captured.err         # the progress bar
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["results"]] == [1, 3]
    assert [m["role"] for m in result["models"]] == ["model", "baseline"]
    assert result["models"][0]["file_bytes"] == os.path.getsize(small)
    assert result["models"][0]["flops_ratio"] == pytest.approx(hand_macs(8) / hand_macs(2))
    assert result["models"][0]["size_ratio"] == pytest.approx(os.path.getsize(big) / os.path.getsize(small))
    for r in result["results"]:
        model, base = r["latency"]
        assert r["speedup"][0] == pytest.approx(base["median_ms"] / model["median_ms"])
        assert r["speedup"][1] == pytest.approx(1.0)
        assert model["p90_ms"] >= model["median_ms"] > 0
        assert model["items_per_s"] == pytest.approx(1000 * r["batch"] / model["median_ms"])


def test_several_models_against_one_baseline(tmp_path, capsys):
    paths = [tiny_model(tmp_path / f"m{c}.onnx", channels=c) for c in (2, 4, 8)]
    out = tmp_path / "result.json"
    assert bench.main(paths[:2] + ["--baseline", paths[2], "--threads", "1", "--warmup", "0", "--runs", "3",
                                   "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [m["role"] for m in result["models"]] == ["model", "model", "baseline"]
    assert [m["flops_ratio"] for m in result["models"]] == pytest.approx(
        [hand_macs(8) / hand_macs(c) for c in (2, 4, 8)])
    (row,) = result["results"]
    assert len(row["latency"]) == 3 and len(row["speedup"]) == 3
    text = capsys.readouterr().out
    assert all(os.path.basename(p) in text for p in paths)


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("granet-bench: error:") and "Traceback" not in err[0]
    return err[0]


def test_bad_files_exit_2_with_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01not a model at all" * 10)
    previous = tmp_path / "keep.json"
    previous.write_text('{"old": true}')
    assert bench.main([str(garbage), "--json", str(previous)]) == 2
    assert "garbage.onnx" in one_line_error(capsys)
    assert previous.read_text() == '{"old": true}', "an existing output is not damaged"
    assert bench.main([str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in one_line_error(capsys)
    # an output it cannot write is refused before anything is measured
    assert bench.main([tiny_model(tmp_path / "ok.onnx"), "--json", str(tmp_path / "no" / "out.json")]) == 2
    assert "--json" in one_line_error(capsys)
    fixed = tiny_model(tmp_path / "fixed.onnx", batch=1)
    assert bench.main([fixed, "--batch", "4", "--runs", "1"]) == 2
    assert "fixed batch size of 1" in one_line_error(capsys)


@pytest.mark.parametrize("args", [["--batch", "1,x"], ["--batch", "0"], ["--runs", "0"], ["--threads", "two"]])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args):
    assert bench.main([tiny_model(tmp_path / "a.onnx")] + args) == 2
    one_line_error(capsys)


def test_external_data_counts_in_size_and_flops(tmp_path):
    model = onnx.load(tiny_model(tmp_path / "inline.onnx"))
    path = tmp_path / "outside.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="outside.onnx.data", size_threshold=0)
    loaded = bench.load(str(path))
    assert loaded.file_bytes == os.path.getsize(path) + os.path.getsize(tmp_path / "outside.onnx.data")
    assert loaded.flops == 2 * hand_macs(4)


def sparse_model(path, indices, values, dims=(4, 4), index_dims=None):
    """y = x @ W with W a sparse initializer (the layout granet-export --sparse-layout initializer writes)."""
    values = np.asarray(values, dtype=np.float32)
    indices = np.asarray(indices, dtype=np.int64)
    v = numpy_helper.from_array(values, "W")
    i = numpy_helper.from_array(indices, "W_idx")
    if index_dims is not None:
        del i.dims[:]
        i.dims.extend(index_dims)
    w = helper.make_sparse_tensor(v, i, list(dims))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "s",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dims[1]])],
                              sparse_initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())
    return str(path)


def test_a_well_formed_sparse_initializer_runs(tmp_path):
    path = sparse_model(tmp_path / "ok.onnx", [1, 6, 15], [1.0, 2.0, 3.0])
    assert bench.main([path, "--threads", "1", "--warmup", "0", "--runs", "1"]) == 0


@pytest.mark.parametrize("indices, values, index_dims, words", [
    ([1, 16], [1.0, 2.0], None, "index outside its 16 positions"),
    ([-1, 3], [1.0, 2.0], None, "index outside"),
    ([6, 1], [1.0, 2.0], None, "not in increasing order"),
    ([3, 3], [1.0, 2.0], None, "not in increasing order"),
    ([1, 2, 3], [1.0, 2.0], None, "indices have dimensions [3]"),
    ([[0, 1], [4, 0]], [1.0, 2.0], None, "index outside its dimensions"),
    ([[1, 0], [0, 1]], [1.0, 2.0], None, "not in increasing order"),
    ([1, 2], [1.0, 2.0], [5], "has 16 bytes of data; its dimensions [5] need 40"),
])
def test_malformed_sparse_tensors_are_refused_before_onnxruntime(tmp_path, capsys, indices, values, index_dims, words):
    path = sparse_model(tmp_path / "bad.onnx", indices, values, index_dims=index_dims)
    assert bench.main([path, "--runs", "1"]) == 2
    line = one_line_error(capsys)
    assert "bad.onnx" in line and words in line, line


def external_model(tmp_path, location):
    model = onnx.load(tiny_model(tmp_path / "inline.onnx"))
    tensor = model.graph.initializer[0]
    raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
    tensor.ClearField("float_data")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value=str(len(raw)))
    (tmp_path / "model").mkdir(exist_ok=True)
    path = tmp_path / "model" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path), raw


@pytest.mark.parametrize("where", ["absolute", "dotdot", "link", "missing", "short", "device"])
def test_external_data_must_stay_inside_the_models_folder(tmp_path, capsys, where):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00" * 4096)
    location = {"absolute": str(secret), "dotdot": "../secret.bin", "link": "link.bin", "missing": "gone.bin",
                "short": "short.bin", "device": "zero"}[where]
    path, raw = external_model(tmp_path, location)
    folder = tmp_path / "model"
    if where == "link":
        os.symlink(secret, folder / "link.bin")
    if where == "short":
        (folder / "short.bin").write_bytes(raw[:-4])
    if where == "device":
        os.symlink("/dev/zero", folder / "zero")
    words = {"absolute": "not a plain relative path", "dotdot": "not a plain relative path",
             "link": "leads outside the model's folder", "missing": "does not exist",
             "short": "reaches past the end", "device": "leads outside"}[where]
    assert bench.main([path, "--runs", "1"]) == 2
    line = one_line_error(capsys)
    assert "m.onnx" in line and words in line, line


def test_external_data_inside_the_folder_is_read(tmp_path):
    path, raw = external_model(tmp_path, "weights.bin")
    (tmp_path / "model" / "weights.bin").write_bytes(raw)
    assert bench.load(path).flops == 2 * hand_macs(4)


def test_special_and_huge_files_are_refused_without_reading_them(tmp_path, capsys):
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as f:
        f.truncate(10 << 30)                       # sparse: no disk used
    for path, words in (("/dev/zero", "not a regular file"), (str(huge), "more than")):
        assert bench.main([path, "--runs", "1"]) == 2
        assert words in one_line_error(capsys)


def test_json_output_that_is_an_input_is_refused(tmp_path, capsys):
    model = tiny_model(tmp_path / "a.onnx")
    before = open(model, "rb").read()
    for out in (model, str(tmp_path / "." / "a.onnx")):
        assert bench.main([model, "--json", out, "--runs", "1"]) == 2
        assert "refusing to overwrite" in one_line_error(capsys)
    base = tiny_model(tmp_path / "b.onnx")
    assert bench.main([model, "--baseline", base, "--json", base, "--runs", "1"]) == 2
    assert "b.onnx" in one_line_error(capsys)
    assert open(model, "rb").read() == before


def hand_roofline_seconds(channels, batch, flops_per_s, bytes_per_s):
    """tiny_model's nodes by hand: the Relu is fused into the Conv and the Reshape moves nothing."""
    nodes = [  # (FLOPs, float32 values moved)
        (2 * batch * 64 * channels * 27, batch * 3 * 64 + channels * 27 + batch * channels * 64),   # Conv
        (2 * batch * 5 * channels * 64, batch * channels * 64 + channels * 64 * 5 + batch * 5),     # MatMul
        (2 * batch * 2 * 5, batch * 5 + 10 + batch * 2),                                          # Gemm
    ]
    return sum(max(f / flops_per_s, 4 * v / bytes_per_s) for f, v in nodes)


def test_roofline_columns_from_the_command_line(tmp_path):
    import subprocess
    import sys

    small = tiny_model(tmp_path / "small.onnx", channels=2)
    big = tiny_model(tmp_path / "big.onnx", channels=8)
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "granet_fx.export.bench", small, "--baseline", big, "--batch", "1,3",
                           "--threads", "1", "--warmup", "1", "--runs", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("batch"))
    for column in ("speedup", "roofline ms", "FLOPs ratio", "roofline limit", "speedup / limit"):
        assert column in header
    assert "GFLOP/s" in proc.stdout and "GB/s" in proc.stdout
    assert "ORT_ENABLE_ALL (NCHWc layout), sequential, intra-op spinning off" in proc.stdout.splitlines()[0]
    result = json.loads(out.read_text())
    for r in result["results"]:
        roof = r["roofline"]
        for i, channels in enumerate((2, 8)):
            expected = hand_roofline_seconds(channels, r["batch"], roof["flops_per_s"], roof["bytes_per_s"][i])
            assert roof["limit_ms"][i] == pytest.approx(1e3 * expected)
        assert r["flops_ratio"][0] == pytest.approx(hand_macs(8) / hand_macs(2))
        assert r["limit"] == pytest.approx([roof["limit_ms"][1] / roof["limit_ms"][0], 1.0])
        assert r["speedup_of_limit"][0] == pytest.approx(r["speedup"][0] / r["limit"][0])
        model_ms, base_ms = (s["median_ms"] for s in r["latency"])
        assert r["roofline_efficiency"] == pytest.approx([roof["limit_ms"][0] / model_ms, roof["limit_ms"][1] / base_ms])
        assert f"{r['limit'][0]:.2f}x" in proc.stdout
    # a speedup above its limit is said plainly
    r = result["results"][0]
    r["speedup"][0] = 2 * r["limit"][0]
    r["speedup_of_limit"][0] = 2.0
    text = bench.format_table(result)
    assert "small.onnx at batch 1" in text and "ABOVE its roofline limit" in text
    r["speedup_of_limit"][0] = 0.5
    assert "ABOVE" not in bench.format_table({**result, "results": [r]})


def test_probes_run_once_in_every_round_between_the_models(tmp_path):
    paths = [tiny_model(tmp_path / f"m{c}.onnx", channels=c) for c in (2, 4)]
    seen = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def run(self):
            seen.append(self.name)

    bench.measure(paths, [1, 3], 1, warmup=1, runs=3, probes={1: [Stub("a"), Stub("b")], 3: [Stub("c")]})
    assert seen == ["a", "b"] * 4 + ["c"] * 4       # warm-up and timed rounds, per batch size
