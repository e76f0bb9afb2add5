"""What the pipeline did to each layer: one :class:`LayerReport` row per conv (or selected Linear).

The passes produce these rows; :class:`convfx.report.Report` formats them with the
model-level totals. Rows are built by the constructors below, never field by field, so a
new column is added in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .convs import Site, SkippedLayer
from .factors import FactorPlan, factor_cost, original_cost
from .meta import IN_SHAPE

__all__ = ["LayerReport", "site_row", "skipped_row", "narrowed_row"]


@dataclass
class LayerReport:
    """One row: a conv (or selected Linear) and what happened to it."""

    fqn: str
    kind: str  # "conv" | "linear"
    shape: tuple[int, ...]  # the weight's: (C_out, C_in/groups, k...); transposed: (C_in, C_out/groups, k...)
    kernel: tuple[int, ...] | None  # one entry per spatial axis (1-3)
    stride: tuple[int, ...] | None
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
    ms_before: float | None = None  # latency objective: the layer's measured time, all its calls
    ms_after: float | None = None  # latency objective: its chosen factors' time (measured or interpolated)

    @property
    def factorized(self) -> bool:
        return self.skipped is None


def site_row(site: Site, plan: FactorPlan | None, reason: str | None, err: float | None = None,
             fit: str = "weights", output_error: float | None = None) -> LayerReport:
    """The row of a layer the graph calls, factorized by ``plan`` or left alone for ``reason``."""
    shape = site.geometry
    macs_b = params_b = macs_a = params_a = 0
    for node in site.nodes:  # a module called several times costs MACs per call
        in_shape = tuple(node.meta[IN_SHAPE])
        mb, pb = original_cost(shape, in_shape)
        macs_b += mb
        params_b = pb
        if plan is not None:
            ma, pa = factor_cost(shape, plan, in_shape)
            macs_a += ma
            params_a = pa
    if plan is None:
        macs_a, params_a = macs_b, params_b
    return LayerReport(
        fqn=site.fqn, kind="linear" if shape.linear else "conv", shape=tuple(site.weight.shape),
        kernel=None if shape.linear else shape.kernel_size, stride=None if shape.linear else shape.stride,
        method=plan.method if plan else None, ranks=plan.ranks if plan else None,
        macs_before=macs_b, macs_after=macs_a, params_before=params_b, params_after=params_a,
        rel_error=err, skipped=reason, fit=fit, output_error=output_error,
    )


def skipped_row(layer: SkippedLayer, shape: tuple[int, ...] = ()) -> LayerReport:
    """The row of a layer no pass could treat (no costs: it may not even be called)."""
    return LayerReport(layer.fqn, layer.kind, shape, None, None, None, None, 0, 0, 0, 0, None,
                       skipped=layer.reason)


def narrowed_row(site: Site, module: nn.Module, widths: tuple[int, ...], output_error: float | None) -> LayerReport:
    """The row of a conv that ``method="id"`` narrowed, costed from its current weight.

    MACs and parameters scale with the kept fraction of the weight (the output size is
    unchanged); a conv shared by two chains lists both hidden widths.
    """
    row = site_row(site, None, None, fit="data", output_error=output_error)
    kept = module.weight.numel() / site.weight.numel()
    bias = getattr(module, "bias", None)
    row.method, row.ranks = "id", widths
    row.macs_after = int(round(row.macs_before * kept))
    row.params_after = module.weight.numel() + (bias.numel() if bias is not None else 0)
    return row
