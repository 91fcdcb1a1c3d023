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
