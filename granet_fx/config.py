"""GraNetConfig: every choice of a sparse training run, validated in one place."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

METHODS = ("granet", "gmp", "fggp", "rigl", "set", "static", "dense")
DISTRIBUTIONS = ("erk", "uniform")
SCOPES = ("global", "layer")
GRANULARITIES = ("unstructured", "channel")  # and "n:m", for example "2:4"
# Methods whose masks start at the final sparsity and never change their density.
FIXED_DENSITY_METHODS = ("rigl", "set", "static")
# Methods that prune gradually along the cubic schedule.
PRUNING_METHODS = ("granet", "gmp", "fggp")
# Methods that drop and regrow connections at update steps.
REGROWTH_METHODS = ("granet", "rigl", "set")

_NM = re.compile(r"^(\d+):(\d+)$")


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass
class GraNetConfig:
    """How to sparsify and train: method, sparsity schedule, regrowth and scope.

    Steps count optimizer steps, i.e. calls to ``GraNet.step()``. The
    defaults are GraNet to 90% sparsity; ``total_steps`` may stay unset here
    and be given to the controller, ``GraNet(model, optimizer, total_steps=T)``.
    """

    method: str = "granet"
    final_sparsity: float = 0.9
    initial_sparsity: float = 0.0
    total_steps: int | None = None
    prune_start: int = 0
    prune_end: int | None = None
    update_every: int = 100
    regrow_fraction: float = 0.5
    regrow_fraction_min: float = 0.005
    distribution: str = "erk"
    scope: str = "global"
    granularity: str = "unstructured"
    # granularity="channel": layers keep a multiple of this many channels; "auto": onnxruntime's NCHWc block
    # on this CPU (16 floats with AVX-512, else 8), the widths its convolutions run without padding;
    # "measured": per group, the step its own layers' onnxruntime speed shows here (export/calibrate.py, cached)
    channel_multiple: int | str = 1
    # granularity="channel", scope="global": every group keeps at least channel_floor x the density of its channels
    # (0.5: no accuracy cost on MNIST-1D, and no stage of a ConvNeXt starved; benchmarks/mnist1d_channel.py --compare)
    channel_floor: float = 0.5
    select_ratio: float = 0.5  # method="fggp": share of active weights, smallest |gradient| first, that may be pruned
    exclude: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)
        self.validate()

    # Derived values -----------------------------------------------------
    @property
    def prune_end_step(self) -> int:
        """Last pruning step: ``prune_end``, or half of ``total_steps`` as in GraNet's scripts."""
        if self.prune_end is not None:
            return self.prune_end
        return (self.total_steps or 0) // 2

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for ``granularity="n:m"``, else None."""
        match = _NM.match(self.granularity) if isinstance(self.granularity, str) else None
        return (int(match[1]), int(match[2])) if match else None

    @property
    def start_sparsity(self) -> float:
        """Sparsity of the masks that ``sparsify`` creates."""
        if self.method == "dense":
            return 0.0
        if self.method in FIXED_DENSITY_METHODS:
            return self.final_sparsity
        return self.initial_sparsity

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GraNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GraNetConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    # Validation ---------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {_choices(METHODS)}; got {self.method!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {_choices(DISTRIBUTIONS)}; got {self.distribution!r}"
            )
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {_choices(SCOPES)}; got {self.scope!r}")
        self._validate_granularity()
        for name in ("final_sparsity", "initial_sparsity"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {value!r}")
        if self.method in PRUNING_METHODS and self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({self.initial_sparsity}) must not exceed "
                f"final_sparsity ({self.final_sparsity})"
            )
        for name in ("regrow_fraction", "regrow_fraction_min"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
        if self.regrow_fraction_min > self.regrow_fraction:
            raise ValueError(
                f"regrow_fraction_min ({self.regrow_fraction_min}) must not exceed "
                f"regrow_fraction ({self.regrow_fraction})"
            )
        if not isinstance(self.select_ratio, (int, float)) or not 0.0 < self.select_ratio <= 1.0:
            raise ValueError(f"select_ratio must be in (0, 1]; got {self.select_ratio!r}")
        if self.method == "fggp" and self.granularity != "unstructured":
            raise ValueError("method='fggp' prunes single weights: it needs granularity='unstructured'")
        if not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1; got {self.update_every!r}")
        if self.channel_multiple not in ("auto", "measured") and (
                isinstance(self.channel_multiple, bool) or not isinstance(self.channel_multiple, int)
                or self.channel_multiple < 1):
            raise ValueError(f"channel_multiple must be an integer >= 1, 'auto' or 'measured'; "
                             f"got {self.channel_multiple!r}")
        floor = self.channel_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
            raise ValueError(f"channel_floor must be a number in [0, 1] (the share of the density that every "
                             f"channel group keeps at least); got {floor!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")
        for pattern in self.exclude:
            if not isinstance(pattern, str):
                raise ValueError(f"exclude must hold module-name glob strings; got {pattern!r}")
        self._validate_steps()

    def _validate_granularity(self) -> None:
        g = self.granularity
        if g in GRANULARITIES:
            return
        nm = self.nm
        if nm is None:
            raise ValueError(
                f"granularity must be one of {_choices(GRANULARITIES)} or 'n:m' (for example '2:4'); got {g!r}"
            )
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"granularity={g!r}: N:M needs 0 < N < M")
        s_f = self.final_sparsity
        if self.method in PRUNING_METHODS + FIXED_DENSITY_METHODS and isinstance(s_f, (int, float)) \
                and abs(s_f - (1 - n / m)) > 1e-9:
            raise ValueError(
                f"granularity={g!r} keeps {n} of every {m} weights: set final_sparsity={1 - n / m:g} "
                f"(got {self.final_sparsity})"
            )

    def _validate_steps(self) -> None:
        # total_steps may be left unset here and given to the controller: GraNet(model, opt, total_steps=T).
        t = self.total_steps
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 1):
            raise ValueError(f"total_steps must be an integer >= 1; got {t!r}")
        if not isinstance(self.prune_start, int) or self.prune_start < 0:
            raise ValueError(f"prune_start must be an integer >= 0; got {self.prune_start!r}")
        if self.prune_end is not None and not isinstance(self.prune_end, int):
            raise ValueError(f"prune_end must be an integer or None; got {self.prune_end!r}")
        if t is not None:
            if self.prune_end_step > t:
                raise ValueError(
                    f"prune_end ({self.prune_end_step}) must not exceed total_steps ({t})"
                )
            if self.prune_start > self.prune_end_step:
                raise ValueError(
                    f"prune_start ({self.prune_start}) must not exceed prune_end ({self.prune_end_step})"
                )
