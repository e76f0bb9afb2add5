"""The per-layer compression report attached to compressed models as ``gm.convfx_report``.

The rows (:class:`LayerReport`) are made by the passes (:mod:`passes.outcome`); this module
adds the model-level totals, the tables and the JSON form that saved models carry.

MAC convention: fvcore's — one multiply-add counts as 1. GFLOPs are printed as
2 × GMACs, which is what most papers (and convfx's research ancestor) call FLOPs.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from passes.outcome import LayerReport

__all__ = ["LayerReport", "Report", "format_count", "latency_summary"]

CONVENTION = "MACs: 1 multiply-add = 1 (fvcore's count). GFLOPs = 2 x GMACs."

_D = TypeVar("_D")


def format_count(n: float) -> str:
    """Human-readable count: 1.23G, 45.6M, 7.8K."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


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
    #: ``method="id"``: hidden width of each narrowed chain, keyed by its last conv; what
    #: :func:`convfx.load` replays (:func:`passes.narrow.narrow_chains`).
    widths: dict[str, int] = field(default_factory=dict)
    #: ``latency_target``: what was measured on the whole model (original and compressed
    #: milliseconds with their interquartile spread, measured and predicted speedup, the
    #: target, backend and device, whether it was reached, the correction rounds).
    latency: dict[str, Any] | None = None

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

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """Rebuild a report from :meth:`to_json` output (a saved model file stores one).

        Every dataclass field is read back by its annotation (JSON lists become the
        tuples and rows they were), so a field added later round-trips without
        touching this; derived keys (``conv_reduction``, ``convention``) are ignored,
        and fields that an older file lacks take their defaults.
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a report is a JSON object, got {type(data).__name__}")
        return _from_dict(cls, data)

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
        timed = any(r.ms_before is not None for r in self.layers)
        if timed:
            head += ["ms before", "ms after"]
        rows: list[tuple[str, ...]] = []
        for r in self.layers:
            ms = (_ms(r.ms_before), _ms(r.ms_after)) if timed else ()
            rows.append((
                r.fqn, "x".join(map(str, r.shape)),
                "x".join(map(str, r.kernel)) if r.kernel else "-",
                "x".join(map(str, r.stride)) if r.stride else "-",
                (r.method + ("+data" if r.fit == "data" else "")) if r.method else "skipped",
                ",".join(map(str, r.ranks)) if r.ranks else "-",
                format_count(r.macs_before), format_count(r.macs_after),
                format_count(r.params_before), format_count(r.params_after),
                f"{r.rel_error:.3g}" if r.rel_error is not None else "-",
            ) + ms)
        if max_rows is not None and len(rows) > max_rows:
            rows = rows[:max_rows] + [("...",) + ("",) * (len(head) - 1)]
        parts = [_grid(head, rows), "", self.totals_table(), "", CONVENTION]
        if self.latency:
            parts.append(latency_summary(self.latency))
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


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def latency_summary(lat: dict[str, Any]) -> str:
    """The whole-model timing of a ``latency_target`` compression, in two lines."""
    line = (f"latency ({lat['backend']}, {lat['device']}): original {lat['original_ms']:.4g} ms "
            f"(IQR {lat['original_spread_ms']:.2g}), compressed {lat['compressed_ms']:.4g} ms "
            f"(IQR {lat['compressed_spread_ms']:.2g}): measured speedup {lat['measured_speedup']:.3f}x, "
            f"predicted {lat['predicted_speedup']:.3f}x, target {1 / lat['target']:.3f}x")
    return line + ("" if lat["reached"] else " (not reached: the fastest model found)")


def _from_dict(cls: type[_D], data: dict[str, Any]) -> _D:
    """An instance of the dataclass ``cls`` from its :func:`dataclasses.asdict` form."""
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: _revive(hints[f.name], data[f.name])
              for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.init and f.name in data}
    return cls(**kwargs)


def _revive(tp: Any, value: Any) -> Any:
    """``value`` as read from JSON, turned back into the type the annotation ``tp`` names."""
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _revive(options[0], value) if len(options) == 1 else value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_revive(args[0], v) for v in value)
        return tuple(_revive(a, v) for a, v in zip(args, value, strict=True)) if args else tuple(value)
    if origin is list:
        return [_revive(args[0], v) for v in value] if args else list(value)
    if origin is dict:
        return {k: _revive(args[1], v) for k, v in value.items()} if args else dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _from_dict(tp, value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def _grid(head: list[str], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    def line(cells: tuple[str, ...] | list[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            out.append(str(c).ljust(w) if i == 0 else str(c).rjust(w))
        return "  ".join(out).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep] + [line(r) for r in rows])
