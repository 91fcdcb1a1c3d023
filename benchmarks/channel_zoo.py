"""How far channel pruning reaches into the HuggingFace zoo (tests/zoo.py): channels, heads and FLOPs.

    python benchmarks/channel_zoo.py                    # writes results/channel_zoo.txt and .json
    python benchmarks/channel_zoo.py --only bert vit    # a part; writes only with --out

Every model of the zoo (tiny configs, random weights, no download) is pruned
one-shot to ``--sparsity`` (default 0.5) of its removable channels by the
controller (``granularity="channel"``, global ranking of the untrained
weights) and compacted with ``gf.compact``, which checks the compacted model
against the masked one. A row gives the channels removed of all the model's
channels (pinned ones included), the attention-head groups found (a group is
one attention layer's heads) and the heads they kept, the channels kept of the groups normalised by layer
norms (residual streams, which train with their statistics over the kept channels), the conv/linear
multiply-accumulates left
(compacted / dense, from the compaction report), the max abs error of the
compacted model, or the error that stopped the model. No timing: the speed of
compacted models is ``speedup.py``'s and ``reach.py``'s.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import granet_fx as gf  # noqa: E402
import zoo  # noqa: E402

from common import RESULTS, command, machine, write_outputs  # noqa: E402
from granet_fx.export.console import first_line  # noqa: E402


def measure(name: str, sparsity: float) -> dict:
    spec = zoo.ZOO[name]
    torch.manual_seed(0)
    model = spec.build().eval()
    inputs = spec.inputs(torch.Generator().manual_seed(1))
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=sparsity, total_steps=1,
                             prune_end=1, update_every=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sparse = gf.sparsify(model, config, example_inputs=inputs)
            granet = gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0))
            granet.step()
            report = gf.compaction_report(gf.compact(sparse, inputs))
    except Exception as e:
        return {"model": name, "error": first_line(e)}
    structured = granet._structured
    heads = [k for g, k in zip(structured.groups, structured.keeps()) if g.rows[0].repeat > 1]
    normed = [k for g, k in zip(structured.groups, structured.keeps()) if any(m.layer_norm for m in g.members)]
    return {"model": name, "channels": report.channels, "removed": report.removed,
            "head_groups": len(heads), "heads": sum(len(k) for k in heads), "heads_kept": sum(int(k.sum()) for k in heads),
            "normed_groups": len(normed), "normed": sum(len(k) for k in normed),
            "normed_kept": sum(int(k.sum()) for k in normed),
            "macs_ratio": report.macs_after / report.macs_before, "max_abs_error": report.max_abs_error}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--only", nargs="+", choices=sorted(zoo.ZOO), metavar="NAME", help="these models only")
    p.add_argument("--out", help="output path without extension (default results/channel_zoo for the whole zoo)")
    args = p.parse_args()
    names = args.only or list(zoo.ZOO)
    rows = []
    for name in names:
        rows.append(measure(name, args.sparsity))
        print(f"{name}: {rows[-1].get('error') or 'done'}", file=sys.stderr, flush=True)
    lines = [f"# {command()}", f"# {machine()}",
             f"channel sparsity {args.sparsity} (one-shot, global ranking), tiny random-weight zoo models", "",
             f"{'model':<14}{'removed':>16}{'head groups':>13}{'heads kept':>12}{'LN groups':>11}{'LN channels kept':>18}"
             f"{'MACs left':>11}{'max abs error':>15}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<14}ERROR: {r['error']}")
        else:
            lines.append(f"{r['model']:<14}{r['removed']:>7} of {r['channels']:<6}{r['head_groups']:>13}"
                         f"{str(r['heads_kept']) + ' of ' + str(r['heads']):>12}{r['normed_groups']:>11}"
                         f"{str(r['normed_kept']) + ' of ' + str(r['normed']):>18}"
                         f"{r['macs_ratio']:>11.3f}{r['max_abs_error']:>15.2g}")
    ok = [r for r in rows if "error" not in r]
    lines += ["", f"{len(ok)} of {len(rows)} compacted; {sum(r['heads_kept'] < r['heads'] for r in ok)} lose attention "
              f"heads, {sum(r['head_groups'] > 0 for r in ok)} have heads that may go, "
              f"{sum(r['normed_kept'] < r['normed'] for r in ok)} lose channels behind layer norms (LN groups: removable "
              "groups normalised by a layer norm); MACs left = compacted / dense conv and linear multiply-accumulates"]
    out = args.out or (str(RESULTS / "channel_zoo") if args.only is None else None)
    text = "\n".join(lines) + "\n"
    data = {"command": command(), "machine": machine(), "sparsity": args.sparsity, "rows": rows}
    if out:
        write_outputs(out, text, data)
    else:
        print(text)


if __name__ == "__main__":
    main()
