"""ONNX file size with sparse weights over the dense file, next to the ideal for int64 COO storage.

For a ResNet-18 (CIFAR size, 11M weights) and a transformer block at 90%,
95% and 98% unstructured sparsity, export the folded model to ONNX (the path
granet-export takes), store the weights sparse, and compare the two file sizes.

Ideal: a float32 weight stored sparse takes 4 bytes for its value and 8 for
its int64 position, so weights at density d take 12 d bytes each instead of
4: ideal = 3 d, with d the fraction of masked conv/linear weights kept. The
measured ratio also carries what stays dense (biases, norms, layers whose
density is above 1/3) and the graph itself. Target: measured <= 1.1 x ideal.

Masks are ERK-distributed random masks (method "static"): a file's size
depends on how many weights each layer keeps, not on which. File size is not
a timing, so a busy machine does not change these figures.

    python benchmarks/export_size.py --json benchmarks/results/export_size.json
"""

from __future__ import annotations

import argparse

import torch

import granet_fx as gf
from granet_fx.export.archive import export_program
from granet_fx.export.bench import write_json
from granet_fx.export.onnx_export import check, max_abs_error, run_onnxruntime, to_onnx
from granet_fx.export.sparse_initializers import store_sparse
from granet_fx.models import TransformerBlock, resnet18

from common import command

MODELS = {
    "resnet18": (lambda: resnet18(), (1, 3, 32, 32)),
    "transformer_block": (lambda: TransformerBlock(dim=256, heads=4), (1, 16, 256)),
}
TARGET = 1.1


def measure(name: str, sparsity: float) -> dict:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = gf.sparsify(build(), gf.GraNetConfig(method="static", final_sparsity=sparsity, total_steps=1))
    model.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        reference = model(x)
    masked = [model.get_buffer(layer.mask_name) for layer in gf.sparse_info(model).masked]
    density = sum(int(m.sum()) for m in masked) / sum(m.numel() for m in masked)
    program, _ = export_program(gf.fold(model), (x,), dynamic_batch=False)
    dense = to_onnx(program)
    sparse, names = store_sparse(dense)
    check(sparse, full=True)
    data = sparse.SerializeToString()
    error = max_abs_error(run_onnxruntime(data, [x]), [reference])
    dense_bytes, sparse_bytes = len(dense.SerializeToString()), len(data)
    ratio, ideal = sparse_bytes / dense_bytes, 3 * density
    # Where the sparse file's bytes go: sparse payload, tensors kept dense, and the graph (nodes, value_info).
    payload = sum(len(a.sparse_tensor.values.raw_data) + len(a.sparse_tensor.indices.raw_data)
                  for node in sparse.graph.node for a in node.attribute if a.name == "sparse_value")
    kept = sum(t.ByteSize() for t in sparse.graph.initializer)
    return {
        "model": name, "sparsity": sparsity, "density": density, "dense_bytes": dense_bytes,
        "sparse_bytes": sparse_bytes, "ratio": ratio, "ideal": ideal, "ratio_over_ideal": ratio / ideal,
        "sparse_payload_bytes": payload, "kept_dense_bytes": kept, "graph_bytes": sparse_bytes - payload - kept,
        "weights_stored_sparse": len(names), "onnxruntime_max_abs_error": error,
        "meets_target": ratio / ideal <= TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--sparsities", default="0.9,0.95,0.98")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print(f"command: {command()}")
    print(f"torch {torch.__version__}, onnx {__import__('onnx').__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}; ideal = 3 x density (float32 values + int64 indices)")
    header = f"{'model':<18} {'sparsity':>8} {'density':>8} {'dense bytes':>12} {'sparse bytes':>12} " \
             f"{'sparse/dense':>12} {'ideal':>7} {'/ideal':>7} {'payload':>11} {'kept dense':>11} {'graph':>8} " \
             f"{'ort err':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for name in MODELS:
        for s in sparsities:
            r = measure(name, s)
            results.append(r)
            print(f"{name:<18} {s:>8.2f} {r['density']:>8.4f} {r['dense_bytes']:>12,} {r['sparse_bytes']:>12,} "
                  f"{r['ratio']:>12.4f} {r['ideal']:>7.4f} {r['ratio_over_ideal']:>6.3f}x {r['sparse_payload_bytes']:>11,} "
                  f"{r['kept_dense_bytes']:>11,} {r['graph_bytes']:>8,} {r['onnxruntime_max_abs_error']:>8.1e}",
                  flush=True)
    worst = max(r["ratio_over_ideal"] for r in results)
    print(f"worst sparse/dense over ideal: {worst:.3f}x (target <= {TARGET}x): "
          f"{'met' if worst <= TARGET else 'NOT met'}")
    print("payload: sparse values + int64 indices; kept dense: weights denser than 1/3, biases, norms, "
          "shape constants; graph: nodes and value_info")
    if args.json:
        write_json({"command": command(), "target_ratio_over_ideal": TARGET, "results": results}, args.json)


if __name__ == "__main__":
    main()
