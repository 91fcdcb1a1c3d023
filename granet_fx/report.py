"""SparsityReport: densities and FLOPs of a sparse model, as a table or as numbers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    active: int
    masked: bool
    macs: int | None = None  # dense multiply-accumulates for the example inputs

    @property
    def density(self) -> float:
        return self.active / self.numel if self.numel else 1.0


@dataclass
class SparsityReport:
    """Where a run stands: per-layer density, global sparsity, FLOPs relative to dense.

    ``global_sparsity`` counts the masked weights only. FLOPs count the
    multiply-accumulates of conv/linear layers, each layer's dense count times
    its density (the convention of the GraNet and RigL papers); training FLOPs
    add this up over the steps taken. They are None when ``sparsify`` had no
    ``example_inputs``.
    """

    method: str
    step: int
    total_steps: int | None
    target_sparsity: float
    regrow_fraction: float
    layers: list[LayerReport] = field(default_factory=list)
    training_flops: float | None = None

    @property
    def global_sparsity(self) -> float:
        return global_sparsity(self.layers)

    @property
    def layer_density(self) -> dict[str, float]:
        return {l.name: l.density for l in self.layers}

    @property
    def inference_flops(self) -> float | None:
        """Inference FLOPs of the sparse model over those of the dense model."""
        return inference_flops(self.layers)

    def __str__(self) -> str:
        rows = [("layer", "kind", "shape", "weights", "density")]
        for l in self.layers:
            density = f"{l.density:.4f}" + ("" if l.masked else " (dense)")
            rows.append((l.name, l.kind, "x".join(map(str, l.shape)), str(l.numel), density))
        lines = columns(rows, rule=True)
        steps = f"{self.step}/{self.total_steps}" if self.total_steps else str(self.step)
        lines.append("")
        lines.append(f"method {self.method}, step {steps}")
        lines.append(
            f"global sparsity {self.global_sparsity:.4f} (target now {self.target_sparsity:.4f}), "
            f"regrowth fraction {self.regrow_fraction:.4f}"
        )
        inf, train = self.inference_flops, self.training_flops
        if inf is None:
            lines.append("FLOPs: unknown (pass example_inputs to granet_fx.sparsify to count them)")
        else:
            lines.append(f"inference FLOPs {inf:.4f} x dense")
            if train is not None:
                lines.append(f"training FLOPs so far {train:.4f} x dense")
        return "\n".join(lines)


def global_sparsity(layers: list[LayerReport]) -> float:
    """The fraction of the masked layers' weights that the masks remove (0 without masked layers)."""
    masked = [l for l in layers if l.masked]
    total = sum(l.numel for l in masked)
    return 1.0 - sum(l.active for l in masked) / total if total else 0.0


def inference_flops(layers: list[LayerReport]) -> float | None:
    """Conv/linear multiply-accumulates at the layers' densities over the dense ones; None if not counted."""
    if not layers or any(l.macs is None for l in layers):
        return None
    dense = sum(l.macs for l in layers)
    return sum(l.macs * l.density for l in layers) / dense if dense else 1.0


def columns(rows: list[tuple[str, ...]], rule: bool = False) -> list[str]:
    """Rows of strings as left-aligned text columns; ``rule`` draws a line under the first row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
