"""Every hostile variant of every file granet_fx reads, through all five readers (library and command).

    python benchmarks/hostile_sweep.py [--sample] [--jobs 2] [--workdir DIR]

Builds the cases of ``tests/hostile.py`` (more than 1,000 variants: archives
for ``gf.load`` and ``granet-export``, state dicts for ``granet-export``, ONNX
files for ``granet-bench``, checkpoints for ``gf.load_checkpoint``, run and
sweep JSON for ``granet-report``), runs each through the library in a worker
process and through its command (``main()`` as the console script calls it, in
a child forked from a process that imported the tools once; 12 kinds of attack
per command also through the installed console script), under a 3 GiB address-space
limit and a time limit, and writes ``benchmarks/results/hostile_sweep.txt``
(summary and every failure, with how its file was made) and ``.json`` (every
run). The command line is the first line of both.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import hostile  # noqa: E402

READERS = {"archive": "gf.load + granet-export (archive)", "export": "granet-export (state dict, outputs)",
           "bench": "granet-bench (ONNX)", "checkpoint": "gf.load_checkpoint", "report": "granet-report (run JSON)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", action="store_true", help="only the sample the default test runs")
    parser.add_argument("--jobs", type=int, default=2, help="commands run at a time (default 2)")
    parser.add_argument("--workdir", type=Path, help="where the cases are written (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hostile_sweep",
                        help="results, without extension (default benchmarks/results/hostile_sweep)")
    args = parser.parse_args()
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        workdir = args.workdir or Path(tmp)
        start = time.perf_counter()
        cases = hostile.build_cases(workdir, full=not args.sample)
        built = time.perf_counter() - start
        print(f"{len(cases)} cases built in {built:.0f} s; running them", file=sys.stderr, flush=True)

        def progress(done, total, r):
            if r["problems"] or done % 50 == 0 or done == total:
                mark = "FAIL " + r["id"] + " " + "; ".join(r["problems"])[:120] if r["problems"] else ""
                print(f"[{done}/{total}] {time.perf_counter() - start:.0f} s {mark}", file=sys.stderr, flush=True)

        real = hostile.subprocess_sample(cases, per_reader=12)
        results = hostile.run_cases(workdir, cases, jobs=args.jobs, subprocesses=real, progress=progress)
        wall = time.perf_counter() - start
        here = str(workdir.resolve()) + "/"
        for r in results:     # paths relative to the work folder: the results name no machine's folders
            r["message"] = r["message"].replace(here, "").replace(str(workdir) + "/", "")
            r["problems"] = [p.replace(here, "").replace(str(workdir) + "/", "") for p in r["problems"]]
    text = report(cmd, cases, results, wall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.txt").write_text(text)
    Path(f"{args.out}.json").write_text(json.dumps({
        "command": cmd, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
        "memory_limit_bytes": hostile.MEMORY_LIMIT, "case_seconds": hostile.CASE_SECONDS, "wall_seconds": wall,
        "cases": len(cases), "runs": results}, indent=1) + "\n")
    print(text)
    return 0 if not any(r["problems"] for r in results) else 1


def report(cmd: str, cases, results, wall: float) -> str:
    by_reader = collections.Counter(c.reader for c in cases)
    failed_cases = {r["id"] for r in results if r["problems"]}
    lines = [cmd, "",
             f"{len(cases):,} hostile variants, {len(results):,} runs (library: in a worker process; command: main() in "
             f"a forked child, and for {sum(r['side'] == 'subprocess' for r in results)} runs the installed console "
             f"script), {hostile.MEMORY_LIMIT >> 30} GiB address-space limit, {hostile.CASE_SECONDS} s per run; "
             f"{wall / 60:.1f} min on {platform.machine()} with {os.cpu_count()} CPUs", ""]
    rows = [("reader", "variants", "runs", "failed variants", "failed runs", "slowest run s")]
    for reader, name in READERS.items():
        rs = [r for r in results if r["reader"] == reader]
        rows.append((name, str(by_reader[reader]), str(len(rs)),
                     str(len({r["id"] for r in rs if r["problems"]})), str(sum(bool(r["problems"]) for r in rs)),
                     f"{max((r['seconds'] for r in rs), default=0):.1f}"))
    rows.append(("all", str(len(cases)), str(len(results)), str(len(failed_cases)),
                 str(sum(bool(r["problems"]) for r in results)), f"{max(r['seconds'] for r in results):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    kinds = collections.Counter(p.split(":")[0] for r in results for p in r["problems"])
    if kinds:
        lines += ["", "problems by kind:"] + [f"  {n:5d}  {k}" for k, n in kinds.most_common()]
    lines += ["", "failures (case [side] how the file was made: what went wrong | the error line):"]
    for r in results:
        if r["problems"]:
            lines.append(f"  {r['id']} [{r['side']}] {r['what']}: {'; '.join(r['problems'])} | {r['message'][:200]}")
    if not failed_cases:
        lines.append("  none")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
