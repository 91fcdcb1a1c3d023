"""Saved runs: what training did over time, and the results of a sweep, as JSON.

A *run* records one real training run: the schedule over time (target
sparsity, actual global sparsity, scheduled regrowth fraction), the measured
share of regrown connections at each mask update, and where each layer ended
(its density next to the ERK density of the same layer at the same final
sparsity). A *sweep* holds the results of many runs (method, sparsity, seed,
test accuracy, FLOPs), their summary over seeds, and a few runs. The plots in
``granet_fx.plots`` and the ``granet-report`` command read both.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from .controller import GraNet
from .criteria import erk_densities
from .export.files import atomic_write

RUN_FORMAT = "granet_fx.run"
SWEEP_FORMAT = "granet_fx.sweep"
VERSION = 1
HISTORY_KEYS = ("step", "target_sparsity", "global_sparsity", "regrow_fraction")


class RunRecorder:
    """Records a run for the plots; call it with the controller after every ``granet.step()``.

    Call it once before the first step too (``train_mnist1d(callback=...)``
    does both). Every ``every`` steps, and at the last step, it stores the
    target sparsity, the global sparsity of the masks and the scheduled
    regrowth fraction. Whenever the masks changed it stores the measured
    regrowth: the fraction of active weights that became exactly zero in the
    update, i.e. were newly regrown (regrown weights start at zero; a weight
    dropped and regrown in the same update keeps its value and does not
    count). ``run()`` returns the record.
    """

    def __init__(self, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1; got {every}")
        self.every = every
        self.history: dict[str, list] = {k: [] for k in HISTORY_KEYS}
        self.updates: dict[str, list] = {"step": [], "regrown_fraction": []}
        self._granet: GraNet | None = None
        self._masks: dict | None = None
        self._zero: dict = {}

    def __call__(self, granet: GraNet) -> None:
        self._granet = granet
        t = granet.step_count
        masks = granet.masks()
        # Active weights at exactly zero: regrown ones, until their first optimizer step.
        zero = {n: m & (granet.model.get_parameter(n) == 0) for n, m in masks.items()}
        active = sum(int(m.sum()) for m in masks.values())
        if self._masks is not None and any(not m.equal(self._masks[n]) for n, m in masks.items()):
            regrown = sum(int((z & ~self._zero[n]).sum()) for n, z in zero.items())
            self.updates["step"].append(t)
            self.updates["regrown_fraction"].append(regrown / active if active else 0.0)
        self._masks, self._zero = masks, zero
        if t % self.every == 0 or t == granet.config.total_steps:
            total = sum(m.numel() for m in masks.values())
            self.history["step"].append(t)
            self.history["target_sparsity"].append(granet.target_sparsity(t))
            self.history["global_sparsity"].append(1.0 - active / total if total else 0.0)
            self.history["regrow_fraction"].append(granet.regrow_fraction(t))

    def run(self, label: str | None = None, accuracy: float | None = None) -> dict[str, Any]:
        """The run record (JSON-ready): config, history, mask updates, final layers."""
        if self._granet is None:
            raise RuntimeError("RunRecorder has not been called with a GraNet controller yet")
        config = self._granet.config
        report = self._granet.report()
        masked = [l for l in report.layers if l.masked]
        erk = erk_densities({l.name: l.shape for l in masked}, 1.0 - config.final_sparsity)
        return {
            "format": RUN_FORMAT,
            "version": VERSION,
            "label": label or config.method,
            "method": config.method,
            "config": config.to_dict(),
            "accuracy": accuracy,
            "inference_flops": report.inference_flops,
            "training_flops": report.training_flops,
            "history": {k: list(v) for k, v in self.history.items()},
            "updates": {k: list(v) for k, v in self.updates.items()},
            "layers": [
                {"name": l.name, "shape": list(l.shape), "density": l.density, "erk_density": erk[l.name]}
                for l in masked
            ],
        }


# Summaries of a sweep -----------------------------------------------------------


def summarize(results: Sequence[dict]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of each (label, sparsity).

    ``results`` holds one dict per run with ``label``, ``method``, ``sparsity``,
    ``seed``, ``accuracy``, ``training_flops`` and ``inference_flops``. The
    standard deviation divides by n - 1 and is None for a single seed.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["label"], r["sparsity"]), []).append(r)
    summary = []
    for (label, sparsity), rows in groups.items():
        acc = [r["accuracy"] for r in rows]
        summary.append({
            "label": label,
            "method": rows[0]["method"],
            "sparsity": sparsity,
            "seeds": len(rows),
            "accuracy_mean": statistics.fmean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else None,
            "training_flops": _mean_or_none(r.get("training_flops") for r in rows),
            "inference_flops": _mean_or_none(r.get("inference_flops") for r in rows),
        })
    return summary


def paired_difference(results: Sequence[dict], a: str, b: str, sparsity: float) -> dict[str, Any] | None:
    """Accuracy of label ``a`` minus label ``b`` at ``sparsity``, paired by seed.

    Returns the mean and sample standard deviation of the per-seed differences,
    how many seeds ``a`` won, and the number of pairs; None without a pair.
    """
    def by_seed(label):
        return {r["seed"]: r["accuracy"] for r in results if r["label"] == label and r["sparsity"] == sparsity}

    sa, sb = by_seed(a), by_seed(b)
    diffs = [sa[s] - sb[s] for s in sorted(sa) if s in sb]
    if not diffs:
        return None
    return {
        "a": a, "b": b, "sparsity": sparsity, "pairs": len(diffs),
        "mean": statistics.fmean(diffs),
        "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
        "wins": sum(d > 0 for d in diffs),
    }


def markdown_table(summary: Sequence[dict]) -> str:
    """The summary as a Markdown table: accuracy in % (mean ± std), FLOPs relative to dense."""
    lines = [
        "| Method | Sparsity | Test accuracy (%) | Training FLOPs | Inference FLOPs | Seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        acc = f"{100 * s['accuracy_mean']:.2f}"
        if s["accuracy_std"] is not None:
            acc += f" ± {100 * s['accuracy_std']:.2f}"
        lines.append(
            f"| {s['label']} | {100 * s['sparsity']:g}% | {acc} | {_times(s['training_flops'])} "
            f"| {_times(s['inference_flops'])} | {s['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def _times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}x"


def _mean_or_none(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else statistics.fmean(values)


# Files ----------------------------------------------------------------------------


def save_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON (no NaN), replacing ``path`` only once it is written whole."""
    atomic_write(path, (json.dumps(data, indent=1, allow_nan=False) + "\n").encode())
    return Path(path)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run or sweep file; raises ValueError naming what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    try:
        check(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return data


def check(data: dict) -> None:
    """Raise ValueError naming the first field of a run or sweep record that is missing or malformed."""
    if not isinstance(data, dict) or data.get("format") not in (RUN_FORMAT, SWEEP_FORMAT):
        raise ValueError("not a granet_fx run or sweep file")
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported version {data.get('version')!r} (expected {VERSION})")
    if data["format"] == SWEEP_FORMAT:
        for i, s in enumerate(_field(data, "summary", list)):
            _field(s, "label", str, f"summary[{i}]")
            for key in ("sparsity", "accuracy_mean"):
                _field(s, key, NUMBER, f"summary[{i}]")
        for run in _field(data, "runs", list):
            check(run)
        return
    _field(data, "label", str)
    history = _field(data, "history", dict)
    if len({len(_field(history, k, list, "history")) for k in HISTORY_KEYS}) != 1:
        raise ValueError("the history lists differ in length")
    updates = _field(data, "updates", dict)
    if len(_field(updates, "step", list, "updates")) != len(_field(updates, "regrown_fraction", list, "updates")):
        raise ValueError("the updates lists differ in length")
    for i, layer in enumerate(_field(data, "layers", list)):
        _field(layer, "name", str, f"layers[{i}]")
        for key in ("density", "erk_density"):
            _field(layer, key, NUMBER, f"layers[{i}]")


NUMBER = (int, float)


def _field(data: Any, key: str, kind: type | tuple, where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if not isinstance(data, dict) or not isinstance(data.get(key), kind):
        what = "number" if kind is NUMBER else kind.__name__
        raise ValueError(f"field {name!r} is missing or not a {what}")
    return data[key]
