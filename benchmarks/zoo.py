"""Every model of the HuggingFace zoo (tests/zoo.py) through the whole granet_fx chain, one table.

    python benchmarks/zoo.py                       # inductor; writes results/zoo.md and results/zoo.json
    python benchmarks/zoo.py --backend aot_eager --only llama t5 --out zoo-quick
    python benchmarks/zoo.py --update --only beit     # again, in place of its row in results/zoo.*

Each model runs in a fresh interpreter (``python tests/zoo.py NAME BACKEND``),
which itself runs ``granet-export`` in another fresh interpreter. The stages,
in order: build, sparsify, ones (all-ones masks change nothing), coverage
(every matmul weight that the forward uses has a mask, found independently
of granet_fx, and the masks act), train (eager GraNet steps), compile (no
graph break beyond the dense model's, GraNet steps under torch.compile),
save (gf.save), export (granet-export), parity (onnxruntime against the
eager outputs). The table gives the last stage each model passed, the first
that failed with its error, and how the dense model does in that step: when
the dense model fails too, the cause is outside granet_fx.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, command, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import zoo as chain  # noqa: E402  (tests/zoo.py: the model builders and the chain)

from granet_fx.export.bench import write_atomic, write_json  # noqa: E402


def run_one(name: str, backend: str, timeout: float) -> dict:
    """One model's chain in a fresh interpreter; its result as a dict."""
    start = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "zoo.py"), name, backend], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return _crashed(name, backend, f"no result in {timeout:.0f} s", start)
    last = done.stdout.strip().splitlines()[-1:] or [""]
    try:
        return json.loads(last[0])
    except ValueError:
        tail = [l for l in done.stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
        return _crashed(name, backend, f"the process died (exit {done.returncode}): {tail[0][:200]}", start)


def _crashed(name: str, backend: str, reason: str, start: float) -> dict:
    spec = chain.ZOO[name]
    return chain.Result(name, spec.family, backend, failed="(process)", reason=reason,
                        seconds=round(time.perf_counter() - start, 1)).to_dict()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(results: list[dict]) -> str:
    rows = ["| model | family | stage reached | failed at | reason | dense model in that step | cause | s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        reached = "**all**" if not r["failed"] else (r["reached"] or "-")
        why = ""
        for known, prefix in ((chain.KNOWN_EXTERNAL.get((r["name"], r["backend"])), "outside granet_fx: "),
                              (chain.DIAGNOSED.get(r["name"]), "")):
            if known and r["failed"] == known[0] and known[1] in r["reason"] + r["dense"]:
                why = prefix + known[2]
        rows.append(f"| {r['name']} | {r['family']} | {reached} | {r['failed'] or ''} | {_cell(r['reason'])} "
                    f"| {_cell(r['dense'])} | {_cell(why)} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend of the compile stage (default inductor)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=list(chain.ZOO), help="run only these models")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per model (default 900)")
    p.add_argument("--out", default=str(RESULTS / "zoo"), help="output path without suffix (default results/zoo)")
    p.add_argument("--update", action="store_true",
                   help="run only the --only models again and replace their rows in the existing OUT.json")
    args = p.parse_args()
    names = args.only or list(chain.ZOO)
    commands, previous = [command()], {}
    if args.update:
        try:
            with open(args.out + ".json") as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--update needs a readable {args.out}.json: {e}")
        if old.get("backend") != args.backend:
            p.error(f"{args.out}.json was run with backend {old.get('backend')}, not {args.backend}")
        commands = old.get("commands", [old["command"]]) + commands
        previous = {r["name"]: r for r in old["models"]}
    results = []
    for i, name in enumerate(names, 1):
        r = run_one(name, args.backend, args.timeout)
        results.append(r)
        status = "passes" if not r["failed"] else f"fails at {r['failed']}: {r['reason']}"
        print(f"[{i}/{len(names)}] {name}: {status} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    if previous:
        fresh = {r["name"]: r for r in results}
        results = [fresh.get(n, r) for n, r in previous.items()] + [r for n, r in fresh.items() if n not in previous]
    passed = sum(1 for r in results if not r["failed"])
    stages = " -> ".join(chain.STAGES)
    text = "\n".join([
        "; then ".join(commands), "",
        f"Machine: {machine()}.", "",
        f"{passed} of {len(results)} models pass every stage ({stages}); torch.compile backend {args.backend}.",
        "Models built from tiny configs with random weights (tests/zoo.py).",
        "Dense model in that step: the model, never sparsified, through the failed step with the same tools "
        "(torch.compile; granet_fx's torch.export and ONNX export; onnxruntime). 'dense fails too' says that "
        "sparsifying is not what breaks it, not that the cause is outside granet_fx: the cause column says where it is.",
        "",
        table(results), ""])
    print(text)
    write_atomic(args.out + ".md", text)
    write_json({"command": "; then ".join(commands), "commands": commands, "machine": machine(), "backend": args.backend, "stages": list(chain.STAGES),
                "passed": passed, "models": results}, args.out + ".json")


if __name__ == "__main__":
    main()
