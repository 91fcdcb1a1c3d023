"""Heads, MLP channels and residual-stream channels that channel pruning removes from HF BERT, ViT and GPT-2,
the FLOPs and onnxruntime speed reached, next to Torch-Pruning's head pruning on the same models.

    python benchmarks/reach.py              # BERT and ViT: writes benchmarks/results/reach.txt and reach.json
    python benchmarks/reach.py --models gpt2 --out benchmarks/results/reach_gpt2
    python benchmarks/reach.py --models vit --hidden 64 --layers 2 --intermediate 128 --runs 5 --out /tmp/reach

The models (``--models``, default both), random weights, no download:

- bert: transformers' BertForSequenceClassification from a BertConfig (vocabulary 1000, ``--seq`` tokens,
  10 labels);
- vit: transformers' ViTForImageClassification from a ViTConfig (``--image`` square images, ``--patch``
  patches, 10 labels);
- gpt2: transformers' GPT2ForSequenceClassification from a GPT2Config (vocabulary 1000, ``--seq`` tokens,
  10 labels, pad token 0, which the inputs never hold): HF ``Conv1D`` layers and a fused q, k, v
  projection (``c_attn``);

all with ``--hidden`` 256, ``--layers`` 4, ``--heads`` 4 (of 64 channels) and ``--intermediate`` 1024, and
scaled_dot_product_attention (HF's "sdpa"). The classification heads make the models' outputs the logits,
so the residual stream is free to narrow.

At each channel sparsity (``--sparsity``) five pruned models are made from the same dense one, one-shot on
the untrained weights (magnitude ranking: the speed depends on the widths that result, not on the values):

- granet: granet_fx channel GraNet (method gmp, one controller step, ``scope="layer"``: every channel group
  at the sparsity, as Torch-Pruning's per-layer ratios), which prunes attention heads as a unit, MLP hidden
  channels and the residual stream (embeddings, class token, position embeddings, every projection writing
  or reading it, its LayerNorms, which take their statistics over the kept channels), then
  granet_fx.compact;
- granet-keep-residual: the same with the first reader of the stream outside the blocks excluded (BERT's
  pooler, ViT's classifier), which keeps the stream whole;
- granet-mlp: the same with the attention modules excluded too (``exclude=("*attention*", ...)``): the
  heads stay whole and only the MLP hidden channels go, to show what pruning heads adds;
- tp: Torch-Pruning 1.6 MetaPruner, MagnitudeImportance(p=2), per-layer ratios (global_pruning=False),
  num_heads on the q, k, v projections, prune_num_heads=True, prune_head_dims=False,
  head_pruning_ratio = pruning_ratio = the sparsity, the classifier ignored (GPT-2 goes through the same
  call: Torch-Pruning 1.6 has no rule for HF's ``Conv1D``, so its layers stay whole; an error would be a NOTE). It also prunes the residual
  stream (embeddings, LayerNorms, every projection's input), recomputing each LayerNorm over the channels
  left (not exact: its statistics change);
- tp-keep-residual: the same with the layers that write the residual stream ignored (every linear or conv
  layer with hidden-size outputs other than q, k, v), so that, like granet-keep-residual, it keeps the
  residual stream.

The dense model, a second export of it (dense-copy: the control, whose speedup shows how far the timings
wander on a busy machine) and all pruned ones are exported to ONNX the way granet-export writes them
(dynamic batch) and measured by granet-bench's measurement (granet_fx.export.bench.run), all of a model's
files run alternately, on ``--threads`` onnxruntime threads. Reported: the heads and MLP channels kept in
each layer, the residual width, linear MACs dense / pruned (conv and linear layers on the example input:
forward hooks for the dense and Torch-Pruning models, granet_fx's CompactionReport for granet's), the FLOPs
ratio counted in the ONNX graphs (it also holds the attention products, which shrink with the heads), and
the speedup = dense median latency / pruned median latency.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import tempfile
import warnings

import torch

import granet_fx as gf
from granet_fx.export.bench import at_least, machine, positive_list, run
from granet_fx.export.roofline import SESSION_SETTINGS
from granet_fx.passes.trace import is_conv1d
from granet_fx.export.console import first_line
from granet_fx.report import columns

from common import choices, command, write_outputs
from speedup import export

MODELS = ("bert", "vit", "gpt2")
VARIANTS = ("granet", "granet-keep-residual", "granet-mlp", "tp", "tp-keep-residual")
STREAM_READER = {"bert": "*pooler*", "vit": "classifier", "gpt2": "score"}   # excluded: the stream stays whole
ATTENTION = {"bert": "*attention*", "vit": "*attention*", "gpt2": "*attn*"}
VOCAB = 1000
CONTROL_TOLERANCE = 0.1      # a NOTE where the dense copy's speedup is further than this from 1
# per-layer parameter names: the query projection and the MLP's first layer (BERT, then ViT), GPT-2's
# fused q, k, v projection and its MLP's first layer (Conv1D: stored (in, out))
QUERY = re.compile(r"\.(\d+)\.attention\.(?:self\.query|q_proj)\.weight$")
MLP_UP = re.compile(r"\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.weight$")
FUSED_QKV = re.compile(r"\.h\.(\d+)\.attn\.c_attn\.weight$")
CONV1D_UP = re.compile(r"\.h\.(\d+)\.mlp\.c_fc\.weight$")
PROJECTIONS = ("query", "key", "value", "q_proj", "k_proj", "v_proj")


def build(name: str, args: argparse.Namespace) -> tuple[str, torch.nn.Module, torch.Tensor]:
    """(description, dense model in eval mode, example input of batch 1); seed 0 for each model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    torch.manual_seed(0)
    sizes = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 intermediate_size=args.intermediate, attn_implementation="sdpa")
    shape = (f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads of {args.hidden // args.heads}, "
             f"intermediate {args.intermediate}")
    if name == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=args.seq, num_labels=10, **sizes)
        x = torch.randint(0, VOCAB, (1, args.seq))
        return (f"BERT (transformers BertForSequenceClassification, {shape}, {args.seq} tokens, vocabulary "
                f"{VOCAB}, 10 labels)", transformers.BertForSequenceClassification(config).eval(), x)
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                                         n_inner=args.intermediate, n_positions=args.seq, num_labels=10,
                                         pad_token_id=0, use_cache=False, attn_implementation="sdpa")
        x = torch.randint(1, VOCAB, (1, args.seq))
        return (f"GPT-2 (transformers GPT2ForSequenceClassification, {shape}, {args.seq} tokens, vocabulary "
                f"{VOCAB}, 10 labels)", transformers.GPT2ForSequenceClassification(config).eval(), x)
    config = transformers.ViTConfig(image_size=args.image, patch_size=args.patch, num_labels=10, **sizes)
    x = torch.randn(1, 3, args.image, args.image)
    tokens = (args.image // args.patch) ** 2 + 1
    return (f"ViT (transformers ViTForImageClassification, {shape}, {args.image}x{args.image} images, patch "
            f"{args.patch}: {tokens} tokens, 10 labels)", transformers.ViTForImageClassification(config).eval(), x)


def widths(model: torch.nn.Module, head_size: int) -> dict:
    """Heads and MLP hidden channels in each layer, the residual width (the query projection's inputs) and
    BERT's pooler width (None for ViT, which has none)."""
    heads, mlp, hidden, pooler = {}, {}, None, None
    for name, p in model.named_parameters():
        if (m := QUERY.search(name)) is not None:
            heads[int(m[1])] = p.shape[0] // head_size
            hidden = p.shape[1] if hidden is None else hidden
        elif (m := MLP_UP.search(name)) is not None:
            mlp[int(m[1])] = p.shape[0]
        elif (m := FUSED_QKV.search(name)) is not None:
            heads[int(m[1])] = p.shape[1] // (3 * head_size)
            hidden = p.shape[0] if hidden is None else hidden
        elif (m := CONV1D_UP.search(name)) is not None:
            mlp[int(m[1])] = p.shape[1]
        elif name.endswith("pooler.dense.weight"):
            pooler = p.shape[0]
    return {"heads": [heads[i] for i in sorted(heads)], "mlp": [mlp[i] for i in sorted(mlp)], "hidden": hidden,
            "pooler": pooler}


def linear_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the conv and linear layers of a plain model on ``x``, counted with forward hooks
    (not for a compacted granet_fx model, whose layers are traced modules: its CompactionReport counts them)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        # each output: one row (one filter) of the weight; a Conv1D's weight is (in, out)
        total += output.numel() * (module.weight.shape[0] if is_conv1d(module) else module.weight[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or is_conv1d(m)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def prune_granet(model: torch.nn.Module, sparsity: float, x: torch.Tensor,
                 exclude: tuple[str, ...]) -> torch.nn.Module:
    """``model`` with ``sparsity`` of its removable channels masked by one controller step, then compacted."""
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=sparsity, total_steps=1,
                             prune_end=1, update_every=1, exclude=exclude, scope="layer")
    with warnings.catch_warnings():   # the warning that lists the excluded layers: excluded on purpose
        warnings.filterwarnings("ignore", message=r"(?s).*excluded by")
        model = gf.sparsify(model, config, example_inputs=(x,))
    granet = gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.0))
    granet.step()
    return gf.compact(model, x)


def prune_torch_pruning(model: torch.nn.Module, sparsity: float, x: torch.Tensor, keep_residual: bool,
                        hidden: int) -> torch.nn.Module:
    """``model`` pruned in place by Torch-Pruning's MetaPruner with whole-head pruning (see the module text)."""
    import torch_pruning as tp

    num_heads, attentions = {}, []
    for m in model.modules():
        projections = [getattr(m, p) for p in PROJECTIONS if isinstance(getattr(m, p, None), torch.nn.Linear)]
        if projections:
            attentions.append(m)
            num_heads.update({p: m.num_attention_heads for p in projections})
    ignored = [getattr(model, "classifier", None) or model.score]
    if keep_residual:   # the layers that write the residual stream: no group is rooted at them
        ignored += [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                    and m not in num_heads and m.weight.shape[0] == hidden]
    # ViT's class token and position embeddings: parameters outside a layer, along the residual channels
    embeddings = getattr(model.base_model, "embeddings", None)   # (GPT-2 has none of its own)
    unwrapped = [(p, p.ndim - 1) for p in embeddings.parameters(recurse=False)] if embeddings is not None else []
    pruner = tp.pruner.MetaPruner(model, (x,), importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=sparsity, global_pruning=False, num_heads=num_heads,
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=sparsity,
                                  ignored_layers=ignored, unwrapped_parameters=unwrapped)
    pruner.step()
    for m in attentions:    # the head counts HF keeps (its forward infers them with view(..., -1, head_size))
        first = next(getattr(m, p) for p in PROJECTIONS if hasattr(m, p))
        m.num_attention_heads = pruner.num_heads[first]
        if hasattr(m, "all_head_size"):
            m.all_head_size = first.out_features
    return model.eval()


def prune(name: str, variant: str, dense: torch.nn.Module, sparsity: float, x: torch.Tensor,
          hidden: int) -> torch.nn.Module:
    model = copy.deepcopy(dense)
    if variant == "granet":
        return prune_granet(model, sparsity, x, ())
    if variant == "granet-keep-residual":
        return prune_granet(model, sparsity, x, (STREAM_READER[name],))
    if variant == "granet-mlp":
        return prune_granet(model, sparsity, x, (ATTENTION[name], STREAM_READER[name]))
    return prune_torch_pruning(model, sparsity, x, variant == "tp-keep-residual", hidden)


def pruned_files(name: str, dense: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, folder: str,
                 notes: list[str]) -> list[dict]:
    """Every variant at every sparsity pruned and exported to ``folder``, after a second export of the dense
    model (the control: measured like the pruned ones, its speedup shows how much the timings wander).

    One dict per file: sparsity, variant, widths, linear MACs, ONNX path.
    """
    head_size = args.hidden // args.heads
    dense_macs = linear_macs(dense, x)
    files = [{"sparsity": 0.0, "variant": "dense-copy", **widths(dense, head_size), "linear_macs": dense_macs,
              "path": os.path.join(folder, f"{name}_dense_copy.onnx")}]
    export(dense, x, files[0]["path"])
    for sparsity in args.sparsity:
        for variant in VARIANTS:
            try:
                model = prune(name, variant, dense, sparsity, x, args.hidden)
            except Exception as e:
                if not variant.startswith("tp"):
                    raise
                notes.append(f"NOTE: {name}, sparsity {sparsity}: Torch-Pruning ({variant}) fails: "
                             f"{type(e).__name__}: {first_line(e)}")
                continue
            entry = {"sparsity": sparsity, "variant": variant, **widths(model, head_size)}
            if variant.startswith("granet"):
                report = gf.compaction_report(model)
                entry["compaction"] = str(report)
                entry["linear_macs"] = report.macs_after
                if report.macs_before != dense_macs:
                    notes.append(f"NOTE: {name}: the compaction report counts {report.macs_before:,} MACs in the "
                                 f"dense model, the forward hooks {dense_macs:,}")
            else:
                entry["linear_macs"] = linear_macs(model, x)
            entry["path"] = os.path.join(folder, f"{name}_{variant}_{sparsity}.onnx")
            export(model, x, entry["path"])
            files.append(entry)
            print(f"{name}, sparsity {sparsity}, {variant}: heads {entry['heads']}, MLP {entry['mlp']}, "
                  f"hidden {entry['hidden']}", file=sys.stderr)
    return files


def per_layer(values: list[int], total: int) -> str:
    return ",".join(str(v) for v in values) + f"/{total}"


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities must lie between 0 and 1, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=choices(MODELS), default=["bert", "vit"],
                        help="bert,vit,gpt2 (default bert,vit)")
    parser.add_argument("--sparsity", type=float_list, default=[0.5, 0.75], help="channel sparsities (0.5,0.75)")
    parser.add_argument("--batch", type=positive_list, default=[1, 8], help="batch sizes (default 1,8)")
    parser.add_argument("--threads", type=at_least(1), default=1, help="onnxruntime threads (default 1)")
    parser.add_argument("--warmup", type=at_least(0), default=10, help="untimed runs per file and batch (default 10)")
    parser.add_argument("--runs", type=at_least(1), default=50, help="timed runs per file and batch (default 50)")
    parser.add_argument("--hidden", type=at_least(1), default=256)
    parser.add_argument("--layers", type=at_least(1), default=4)
    parser.add_argument("--heads", type=at_least(1), default=4)
    parser.add_argument("--intermediate", type=at_least(1), default=1024)
    parser.add_argument("--seq", type=at_least(1), default=64, help="BERT and GPT-2 tokens (default 64)")
    parser.add_argument("--image", type=at_least(1), default=64, help="ViT image size (default 64)")
    parser.add_argument("--patch", type=at_least(1), default=8, help="ViT patch size (default 8)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "reach"),
                        help="output path without extension (default benchmarks/results/reach)")
    args = parser.parse_args()
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    torch.set_num_threads(args.threads)
    head_size = args.hidden // args.heads
    cmd, m = command(), machine()
    models = {name: build(name, args) for name in args.models}

    rows = [("model", "sparsity", "variant", "batch", "heads kept", "MLP kept", "hidden", "linear MACs ratio",
             "FLOPs ratio", "dense ms", "pruned ms", "speedup", "speedup / FLOPs ratio")]
    details, notes, loads = [], [], []
    results = {"command": cmd, "machine": m, "threads": args.threads, "session": SESSION_SETTINGS,
               "head_size": head_size, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (description, dense, x) in models.items():
            dense_path = os.path.join(tmp, f"{name}_dense.onnx")
            export(dense, x, dense_path)
            files = pruned_files(name, dense, x, args, tmp, notes)
            loads.append(os.getloadavg()[0])
            bench = run([e["path"] for e in files], dense_path, args.batch, args.threads, args.warmup, args.runs)
            for e, b in zip(files, bench["models"]):
                e["flops_ratio"] = b["flops_ratio"]
            for e in files + bench["models"]:   # the files lived in a temporary folder
                e["path"] = os.path.basename(e["path"])
            dense_macs = files[0]["linear_macs"]
            for r in bench["results"]:
                if abs(r["speedup"][0] - 1) > CONTROL_TOLERANCE:
                    notes.append(f"NOTE: {name} at batch {r['batch']}: the dense copy ran {r['speedup'][0]:.2f}x as "
                                 "fast as the dense file (the same model): the speedups at this batch carry that "
                                 "much noise")
            for i, e in enumerate(files):
                for r in bench["results"]:
                    pruned_ms, dense_ms = r["latency"][i]["median_ms"], r["latency"][-1]["median_ms"]
                    speedup = r["speedup"][i]
                    rows.append((name, f"{e['sparsity']:.2f}", e["variant"], str(r["batch"]),
                                 per_layer(e["heads"], args.heads), per_layer(e["mlp"], args.intermediate),
                                 f"{e['hidden']}/{args.hidden}", f"{dense_macs / e['linear_macs']:.2f}x",
                                 f"{e['flops_ratio']:.2f}x", f"{dense_ms:.2f}", f"{pruned_ms:.2f}",
                                 f"{speedup:.2f}x", f"{speedup / e['flops_ratio']:.2f}"))
                if i:
                    details += ["", f"{name}, sparsity {e['sparsity']}, {e['variant']}: heads {e['heads']} of "
                                f"{args.heads}, MLP channels {e['mlp']} of {args.intermediate}, residual width "
                                f"{e['hidden']} of {args.hidden}"
                                + (f", pooler {e['pooler']} of {args.hidden}" if e["pooler"] else "") + "; "
                                f"linear MACs {dense_macs:,} -> {e['linear_macs']:,}"]
                    details += [e["compaction"]] if "compaction" in e else []
            results["models"][name] = {"description": description, "control": files[0], "pruned": files[1:],
                                       "bench": bench}
    results["load_before"] = loads
    lines = [f"$ {cmd}"]
    lines += [f"{name}: {description}" for name, (description, _, _) in models.items()]
    lines += [f"onnxruntime on {m['cpu']} ({m['logical_cpus']} logical CPUs), {args.threads} thread(s), warm-up "
              f"{args.warmup}, {args.runs} timed runs, each model's dense and pruned files run alternately; "
              f"sessions: {SESSION_SETTINGS}",
              "load average (1 min) before each model's measurements: "
              + ", ".join(f"{name} {load:.1f}" for name, load in zip(models, loads))
              + f" on {os.cpu_count()} logical CPUs (other work on the machine slows dense and pruned alike: "
              "compare the ratios)", ""]
    lines += columns(rows)
    lines += ["", "granet = granet_fx channel pruning per group (heads as a unit, MLP channels and the residual "
              "stream, its LayerNorms over the kept channels), granet-keep-residual = the same with the stream kept "
              "whole, granet-mlp = the same with the attention modules excluded too (heads whole), tp = Torch-Pruning "
              "1.6 with whole-head pruning, which also prunes the residual stream (embeddings, LayerNorms recomputed "
              "over the channels left), tp-keep-residual = Torch-Pruning with the residual writers ignored, "
              "dense-copy = a second export of the dense model, measured like the pruned ones (its speedup shows how "
              "much the timings wander)",
              f"heads kept / MLP kept: per layer, of {args.heads} heads and {args.intermediate} channels; hidden = "
              "residual width; linear MACs ratio = dense / pruned conv and linear multiply-accumulates (forward "
              "hooks for the dense and Torch-Pruning models, granet_fx's CompactionReport for granet's); FLOPs "
              "ratio = dense / pruned FLOPs counted in the ONNX graphs (MatMul, Gemm, Conv, with the attention "
              "products); speedup = dense ms / pruned ms (medians)"]
    lines += ([""] + notes) if notes else []
    lines += details
    write_outputs(args.out, "\n".join(lines) + "\n", results)


if __name__ == "__main__":
    main()
