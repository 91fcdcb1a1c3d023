"""PNG plots of saved runs and sweeps (matplotlib), and the ``granet-report`` command.

    granet-report run.json -o plots/        # schedule.png, layer_density.png
    granet-report accuracy.json -o plots/   # and accuracy.png for a sweep

Needs the ``plots`` extra: ``pip install 'granet-fx[plots]'``.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from . import runs
from .export.console import ArgumentParser, first_line
from .export.files import atomic_write, same_file


def _figure(rows: int = 1, height: float = 4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'granet-fx[plots]'") from e
    fig = Figure(figsize=(7.5, height * rows), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def _png(fig) -> bytes:
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    return png.getvalue()


def _save(fig, path: str | os.PathLike) -> Path:
    atomic_write(path, _png(fig))
    return Path(path)


def plot_accuracy(sweep: dict, path: str | os.PathLike) -> Path:
    """Test accuracy (mean ± std over seeds) against sparsity, one line per method; dense as a band."""
    return _save(_accuracy_figure(sweep), path)


def plot_schedule(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Sparsity (target and actual) and regrowth fraction (scheduled and measured) over training."""
    return _save(_schedule_figure(records), path)


def plot_layer_density(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Final density of each layer per run, next to ERK's density at the same final sparsity."""
    return _save(_layer_density_figure(records), path)


def _accuracy_figure(sweep: dict):
    fig, (ax,) = _figure()
    summary = sweep["summary"]
    sparse = [s for s in summary if s["sparsity"] > 0]
    levels = sorted({s["sparsity"] for s in sparse})
    labels = list(dict.fromkeys(s["label"] for s in sparse))
    for s in summary:
        if s["sparsity"] == 0:
            mean, std = 100 * s["accuracy_mean"], 100 * (s["accuracy_std"] or 0.0)
            ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"{s['label']} ({mean:.1f}%)")
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
    for i, label in enumerate(labels):
        rows = {s["sparsity"]: s for s in sparse if s["label"] == label}
        xs = [levels.index(x) + 0.04 * (i - (len(labels) - 1) / 2) for x in levels if x in rows]
        ys = [100 * rows[x]["accuracy_mean"] for x in levels if x in rows]
        es = [100 * (rows[x]["accuracy_std"] or 0.0) for x in levels if x in rows]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.set_xticks(range(len(levels)), [f"{100 * x:g}%" for x in levels])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    seeds = "/".join(str(n) for n in sorted({s["seeds"] for s in summary}))
    ax.set_title(f"{sweep.get('title', 'Test accuracy')} (mean ± std over {seeds} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _schedule_figure(records: Sequence[dict]):
    fig, (top, bottom) = _figure(2, 3.2)
    for i, run in enumerate(records):
        color = f"C{i}"
        h, u = run["history"], run["updates"]
        top.plot(h["step"], h["target_sparsity"], color=color, linestyle="--", linewidth=1)
        top.step(h["step"], h["global_sparsity"], where="post", color=color, label=run["label"])
        bottom.plot(h["step"], h["regrow_fraction"], color=color, linestyle="--", linewidth=1)
        bottom.plot(u["step"], u["regrown_fraction"], color=color, marker=".", linestyle="none", label=run["label"])
    top.set_ylabel("global sparsity")
    top.set_title("Sparsity: actual (solid), cubic schedule's target (dashed)")
    bottom.set_ylabel("fraction of active weights")
    bottom.set_title("Regrowth: scheduled fraction (dashed), measured at each mask update (dots)")
    bottom.set_xlabel("training step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _layer_density_figure(records: Sequence[dict]):
    fig, (ax,) = _figure()
    names = list(dict.fromkeys(layer["name"] for run in records for layer in run["layers"]))
    bars: list[tuple[str, dict]] = []
    erk_seen = set()
    for run in records:
        sparsity = run["config"]["final_sparsity"] if "config" in run else None
        if sparsity not in erk_seen:
            erk_seen.add(sparsity)
            at = "" if sparsity is None else f" at {100 * sparsity:g}%"
            bars.append((f"ERK{at}", {l["name"]: l["erk_density"] for l in run["layers"]}))
        bars.append((run["label"], {l["name"]: l["density"] for l in run["layers"]}))
    width = 0.8 / max(len(bars), 1)
    for i, (label, density) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j, n in enumerate(names) if n in density]
        ax.bar(xs, [density[n] for n in names if n in density], width, label=label,
               color="0.6" if label.startswith("ERK") else None, hatch="//" if label.startswith("ERK") else None)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_yscale("log")
    ax.set_ylabel("density (kept fraction, log scale)")
    ax.set_title("Per-layer density at the end of training")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


def plot_report(source: str | os.PathLike | dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write the PNGs of a run or sweep (a file written by ``granet_fx.runs.save_json`` or its dict).

    A run gives ``schedule.png`` and ``layer_density.png``; a sweep also gives
    ``accuracy.png``, and the schedule and density plots of the runs it holds.
    The record is checked first (``runs.check``) and every plot is drawn before
    any file is written; the PNGs are then written under temporary names and
    renamed, so the set in ``out_dir`` is replaced whole or not at all.
    Returns the paths written.
    """
    if isinstance(source, dict):
        runs.check(source)
        data = source
    else:
        data = runs.load(source)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    records = [data] if data["format"] == runs.RUN_FORMAT else data["runs"]
    figures = {}
    if data["format"] == runs.SWEEP_FORMAT and data["summary"]:
        figures["accuracy.png"] = _accuracy_figure
    if records:
        figures["schedule.png"] = lambda _: _schedule_figure(records)
        if any(run["layers"] for run in records):
            figures["layer_density.png"] = lambda _: _layer_density_figure(records)
    if not isinstance(source, dict):
        for name in figures:
            if same_file(source, out / name):
                raise ValueError(f"{out / name} is the input file {source}; refusing to overwrite it")
    pngs = {name: _png(draw(data)) for name, draw in figures.items()}
    out.mkdir(parents=True, exist_ok=True)
    return replace_all(out, pngs)


def replace_all(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Write ``files`` (name -> bytes) into ``folder``: all to temporary files first, then rename each.

    A failure while writing leaves every existing file as it was and no
    temporary file behind.
    """
    written: list[tuple[str, Path]] = []
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            written.append((tmp, folder / name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        for tmp, _ in written:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for tmp, path in written:
        os.replace(tmp, path)
    return [path for _, path in written]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: Sequence[str] | None = None) -> int:
    """``granet-report RUN.json -o DIR``: write the PNGs of a saved run or sweep; 2 on bad input."""
    parser = ArgumentParser(prog="granet-report", description="Write PNG plots of a saved granet_fx run or sweep (JSON).")
    parser.add_argument("file", help="a run or sweep file (JSON)")
    parser.add_argument("-o", "--out", default=".", help="folder for the PNGs (default: current folder)")
    try:
        args = parser.parse_args(argv)
        for path in plot_report(args.file, args.out):
            print(path)
    except (ValueError, OSError, ImportError) as e:
        print(f"granet-report: error: {first_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:   # a record that passed the checks and still fails to plot: one line, not a traceback
        print(f"granet-report: error: cannot plot {args.file}: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return 2
    return 0
