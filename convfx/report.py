"""The per-layer compression report attached to compressed models as ``gm.convfx_report``.

MAC convention: fvcore's — one multiply-add counts as 1. GFLOPs are printed as
2 × GMACs, which is what most papers (and convfx's research ancestor) call FLOPs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerReport", "Report", "format_count"]

CONVENTION = "MACs: 1 multiply-add = 1 (fvcore's count). GFLOPs = 2 x GMACs."


def format_count(n: float) -> str:
    """Human-readable count: 1.23G, 45.6M, 7.8K."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


@dataclass
class LayerReport:
    """One row: a conv (or selected Linear) and what happened to it."""

    fqn: str
    kind: str  # "conv" | "linear"
    shape: tuple[int, ...]  # (C_out, C_in/groups, k_h, k_w) or (out, in)
    kernel: tuple[int, int] | None
    stride: tuple[int, int] | None
    method: str | None  # None when skipped
    ranks: tuple[int, ...] | None
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    rel_error: float | None
    skipped: str | None = None  # reason, when left alone
    fit: str = "weights"  # "weights" (data-free) or "data" (calibrated)
    output_error: float | None = None  # relative output error on calibration data (data fits)

    @property
    def factorized(self) -> bool:
        return self.skipped is None


@dataclass
class Report:
    """What ``compress`` did, layer by layer, with model-level totals counted by fvcore."""

    layers: list[LayerReport]
    conv_macs_before: int
    conv_macs_after: int
    total_macs_before: int
    total_macs_after: int
    params_before: int
    params_after: int
    input_shapes: list[tuple[int, ...]]
    method: str
    rank: str
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def conv_reduction(self) -> float:
        """Conv-MAC reduction factor (before / after)."""
        return self.conv_macs_before / max(self.conv_macs_after, 1)

    @property
    def factorized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.factorized]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if not r.factorized]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv_reduction"] = self.conv_reduction
        d["convention"] = CONVENTION
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def totals_table(self) -> str:
        """The model-level before/after summary, MACs and GFLOPs labelled separately."""
        rows = [
            ("conv MACs", format_count(self.conv_macs_before), format_count(self.conv_macs_after),
             f"{self.conv_reduction:.2f}x"),
            ("conv GFLOPs (2xMACs)", f"{2 * self.conv_macs_before / 1e9:.3f}",
             f"{2 * self.conv_macs_after / 1e9:.3f}", ""),
            ("total MACs", format_count(self.total_macs_before), format_count(self.total_macs_after),
             f"{self.total_macs_before / max(self.total_macs_after, 1):.2f}x"),
            ("params", format_count(self.params_before), format_count(self.params_after),
             f"{self.params_before / max(self.params_after, 1):.2f}x"),
        ]
        return _grid(["", "before", "after", "reduction"], rows)

    def to_table(self, max_rows: int | None = None) -> str:
        """A readable per-layer table followed by totals, the convention and assumptions."""
        head = ["layer", "shape", "kernel", "stride", "method", "ranks", "MACs before", "MACs after",
                "params before", "params after", "rel.err"]
        rows: list[tuple[str, ...]] = []
        for r in self.layers:
            rows.append((
                r.fqn, "x".join(map(str, r.shape)),
                "x".join(map(str, r.kernel)) if r.kernel else "-",
                "x".join(map(str, r.stride)) if r.stride else "-",
                (r.method + ("+data" if r.fit == "data" else "")) if r.method else "skipped",
                ",".join(map(str, r.ranks)) if r.ranks else "-",
                format_count(r.macs_before), format_count(r.macs_after),
                format_count(r.params_before), format_count(r.params_after),
                f"{r.rel_error:.3g}" if r.rel_error is not None else "-",
            ))
        if max_rows is not None and len(rows) > max_rows:
            rows = rows[:max_rows] + [("...",) + ("",) * (len(head) - 1)]
        parts = [_grid(head, rows), "", self.totals_table(), "", CONVENTION]
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        parts.append(f"input: {shapes}; method={self.method}; rank={self.rank}; "
                     f"{len(self.factorized)} layer(s) factorized, {len(self.skipped)} skipped; "
                     f"{self.seconds:.2f}s")
        if self.skipped:
            parts.append("skipped:")
            parts.extend(f"  {r.fqn}: {r.skipped}" for r in self.skipped)
        parts.extend(f"assumption: {a}" for a in self.assumptions)
        parts.extend(f"note: {n}" for n in self.notes)
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.to_table()


def _grid(head: list[str], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    def line(cells: tuple[str, ...] | list[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            out.append(str(c).ljust(w) if i == 0 else str(c).rjust(w))
        return "  ".join(out).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep] + [line(r) for r in rows])
