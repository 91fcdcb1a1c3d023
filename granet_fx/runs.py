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
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from .controller import GraNet
from .criteria import erk_densities
from .export.console import first_line
from .export.files import FileReadError, atomic_write, read_bounded

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


def accuracy_cell(s: dict) -> str:
    """A summary row's test accuracy in %, mean ± std (the std when there are several seeds)."""
    acc = f"{100 * s['accuracy_mean']:.2f}"
    if s["accuracy_std"] is not None:
        acc += f" ± {100 * s['accuracy_std']:.2f}"
    return acc


def markdown_table(summary: Sequence[dict]) -> str:
    """The summary as a Markdown table: accuracy in % (mean ± std), FLOPs relative to dense."""
    lines = [
        "| Method | Sparsity | Test accuracy (%) | Training FLOPs | Inference FLOPs | Seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['label']} | {100 * s['sparsity']:g}% | {accuracy_cell(s)} | {_times(s['training_flops'])} "
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


MAX_FILE_BYTES = 256 << 20   # a run or sweep file; a real sweep is a few MB
MAX_DEPTH = 32               # nesting of JSON objects and lists; a real file needs 6
MAX_TEXT = 200               # characters of a label, name or title (the plots show them)
MAX_POINTS = 1_000_000       # entries of a history or updates list
MAX_ITEMS = 10_000           # layers of a run, rows of a summary
MAX_RUNS = 100               # runs in a sweep (one colour and legend entry each)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run or sweep file; raises ValueError naming the file and what is wrong with it."""
    try:
        data = read_json(path, what="run or sweep file")
        check(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return data


def read_json(path: str | os.PathLike, *, what: str = "JSON file", limit: int = MAX_FILE_BYTES) -> Any:
    """The JSON value in ``path``, read within ``limit`` bytes and ``MAX_DEPTH`` levels of nesting.

    ValueError (without the file's name) for a file that is not a regular file,
    too large, not UTF-8 JSON, holds NaN or infinity, or nests too deeply.
    """
    try:
        raw = read_bounded(path, limit=limit, what=what)
    except FileReadError as e:
        message = str(e)
        prefix = f"{os.fspath(path)}: "
        raise ValueError(message[len(prefix):] if message.startswith(prefix) else message) from None
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"not a {what}: JSON nested more than {MAX_DEPTH} levels deep") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not a JSON file ({first_line(e)})") from None
    if _depth(data) > MAX_DEPTH:
        raise ValueError(f"not a {what}: JSON nested more than {MAX_DEPTH} levels deep")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (0 for a scalar), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        value, level = todo.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        todo.extend((c, level + 1) for c in children)
    return deepest


def check(data: dict) -> None:
    """Raise ValueError naming the first field of a run or sweep record that is missing or malformed.

    Types, ranges (fractions in [0, 1], steps >= 0, finite numbers), required
    keys and sizes (label and name lengths, list lengths) are checked, so that
    what passes can be plotted.
    """
    if not isinstance(data, dict) or data.get("format") not in (RUN_FORMAT, SWEEP_FORMAT):
        raise ValueError("not a granet_fx run or sweep file")
    if type(data.get("version")) is not int or data["version"] != VERSION:
        raise ValueError(f"unsupported version {_short(data.get('version'))} (expected {VERSION})")
    if data["format"] == SWEEP_FORMAT:
        _check_sweep(data)
    else:
        _check_run(data)


def _check_sweep(data: dict) -> None:
    _optional(data, "title", _TEXT)
    summary = _field(data, "summary", _list(MAX_ITEMS))
    for i, s in enumerate(summary):
        where = f"summary[{i}]"
        _field(s, "label", _TEXT, where)
        _optional(s, "method", _TEXT, where)
        _field(s, "sparsity", _FRACTION, where)
        _field(s, "seeds", _COUNT, where)
        _field(s, "accuracy_mean", _FRACTION, where)
        _optional(s, "accuracy_std", _NONNEGATIVE, where)
        for key in ("training_flops", "inference_flops"):
            _optional(s, key, _NONNEGATIVE, where)
    for i, run in enumerate(_field(data, "runs", _list(MAX_RUNS))):
        try:
            if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
                raise ValueError("is not a run record")
            check(run)
        except ValueError as e:
            raise ValueError(f"runs[{i}]: {e}") from None


def _check_run(data: dict) -> None:
    _field(data, "label", _TEXT)
    _optional(data, "method", _TEXT)
    _optional(data, "accuracy", _FRACTION)
    for key in ("inference_flops", "training_flops"):
        _optional(data, key, _NONNEGATIVE)
    if "config" in data:
        config = _field(data, "config", _DICT)
        _optional(config, "final_sparsity", _FRACTION, "config")
    history = _field(data, "history", _DICT)
    lengths = set()
    for key in HISTORY_KEYS:
        values = _field(history, key, _list(MAX_POINTS), "history")
        _each(values, _STEP if key == "step" else _FRACTION, f"history.{key}")
        lengths.add(len(values))
    if len(lengths) != 1:
        raise ValueError("the history lists differ in length")
    updates = _field(data, "updates", _DICT)
    steps = _field(updates, "step", _list(MAX_POINTS), "updates")
    _each(steps, _STEP, "updates.step")
    fractions = _field(updates, "regrown_fraction", _list(MAX_POINTS), "updates")
    _each(fractions, _FRACTION, "updates.regrown_fraction")
    if len(steps) != len(fractions):
        raise ValueError("the updates lists differ in length")
    for i, layer in enumerate(_field(data, "layers", _list(MAX_ITEMS))):
        where = f"layers[{i}]"
        _field(layer, "name", _TEXT, where)
        if "shape" in layer:
            shape = _field(layer, "shape", _list(16), where)
            _each(shape, _STEP, f"{where}.shape")
        for key in ("density", "erk_density"):
            _field(layer, key, _FRACTION, where)


# Field checks: each is (what it must be, test) ------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


NUMBER = (int, float)
_TEXT = (f"a string of at most {MAX_TEXT} printable characters",
         lambda v: isinstance(v, str) and len(v) <= MAX_TEXT and v.isprintable())
_FRACTION = ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
_NONNEGATIVE = ("null or a number >= 0", lambda v: v is None or (_is_number(v) and v >= 0))
_STEP = ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
_COUNT = ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
_DICT = ("an object", lambda v: isinstance(v, dict))


def _list(limit: int) -> tuple[str, Any]:
    return f"a list of at most {limit:,} entries", lambda v: isinstance(v, list) and len(v) <= limit


def _field(data: Any, key: str, rule: tuple[str, Any], where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if not isinstance(data, dict):
        raise ValueError(f"field {where!r} is not an object")
    if key not in data:
        raise ValueError(f"field {name!r} is missing")
    value = data[key]
    if not rule[1](value):
        raise ValueError(f"field {name!r} is {_short(value)}; expected {rule[0]}")
    return value


def _optional(data: dict, key: str, rule: tuple[str, Any], where: str = "") -> Any:
    rule = ((rule[0] if rule[0].startswith("null") else f"null or {rule[0]}"),
            lambda v, test=rule[1]: v is None or test(v))
    return _field(data, key, rule, where) if key in data else None


def _each(values: list, rule: tuple[str, Any], name: str) -> None:
    bad = next((i for i, v in enumerate(values) if not rule[1](v)), None)
    if bad is not None:
        raise ValueError(f"field '{name}[{bad}]' is {_short(values[bad])}; expected {rule[0]}")


def _short(value: Any) -> str:
    """``value`` for an error message: its type and, when short, its text."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {len(value):,} characters"
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'object'} of {len(value):,} entries"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = repr(value)
    return text if len(text) <= 40 else f"a number of {len(text):,} digits"
