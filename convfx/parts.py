"""The product side of models whose root cannot be traced: the report and the analysis.

:func:`passes.parts.compress_parts` compresses the model's largest traceable submodules in
place; this module attaches what :func:`convfx.compress` promises to its result: a
:class:`~convfx.report.Report` over every conv of the *whole* model (``convfx_report``) and
the parts' description that :func:`convfx.save` records (``convfx_parts``). The result is
the user's own ``nn.Module`` (a copy unless ``inplace``), not a GraphModule: its ``forward``
is the user's, with factorized layers under the original names.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from passes.options import CompressOptions
from passes.parts import LayerCall, Split, compress_parts, count_calls, flatten
from passes.pipeline import check_tensors, count_params

from .report import Report

__all__ = ["PARTS_ATTR", "compress_untraced", "analyze_untraced", "mac_convention"]

log = logging.getLogger("convfx")

#: Attribute of a compressed model that holds its parts (:meth:`passes.parts.Split.to_dict`).
PARTS_ATTR = "convfx_parts"


def _input_shapes(inputs: tuple[Any, ...]) -> list[tuple[int, ...]]:
    """Shapes of every tensor in the positional arguments (a detector's list of images included)."""
    leaves: list[Any] = []
    try:
        flatten(inputs, leaves)
    except Exception:  # noqa: BLE001 - an argument of another type: list the top-level tensors
        leaves = [x for x in inputs if isinstance(x, torch.Tensor)]
    return [tuple(t.shape) for t in leaves]


def mac_convention(calls: list[LayerCall]) -> str:
    """How a model with an untraceable root is counted, naming the first conv's input shape."""
    first = next((c for c in calls if c.kind == "conv"), None)
    seen = f"; its first conv saw an input of shape {'x'.join(map(str, first.in_shape))}" if first else ""
    return ("MACs of a model whose root cannot be traced: every conv (and Linear) call of one eager run on "
            "example_inputs, counted with fvcore's formulas on the shapes each layer actually saw (a "
            "torchvision detector's transform resizes and batches the images first)" + seen
            + "; total MACs = conv + Linear MACs")


def _notes(split: Split, n_items: int) -> list[str]:
    """What the report says about the parts: which were traced, which not and why."""
    notes = [f"the root cannot be traced ({split.root}): its {len(split.parts)} largest traceable submodule(s) "
             f"were compressed in place and the model is returned as itself (an nn.Module running its own "
             f"forward), not as a GraphModule. Parts: {', '.join(p.path for p in split.parts)}"]
    notes.extend(f"not traced: {path!r}: {why}" for path, why in split.untraced.items())
    if n_items:
        notes.append(f"factors fitted on {n_items} calibration item(s), each part on the inputs the original model "
                     "gave it (recorded by forward hooks)")
    return notes


def compress_untraced(model: nn.Module, inputs: tuple[Any, ...], options: CompressOptions, assumptions: list[str],
                      root: str, t0: float) -> nn.Module:
    """:func:`convfx.compress` for a model whose root ``forward`` cannot be traced (see module doc)."""
    params_before = count_params(model)
    out = compress_parts(model, inputs, options, assumptions, root)
    ctx, result = out.ctx, out.model
    report = Report(
        layers=ctx.rows, conv_macs_before=out.conv_before, conv_macs_after=out.conv_after,
        total_macs_before=out.conv_before + out.linear_before, total_macs_after=out.conv_after + out.linear_after,
        params_before=params_before, params_after=count_params(result), input_shapes=_input_shapes(inputs),
        method=options.method, rank=options.rank_label,
        assumptions=[*ctx.assumptions, mac_convention(out.split.calls)],
        seconds=time.perf_counter() - t0, widths=dict(ctx.widths),
    )
    report.notes.extend(_notes(out.split, out.n_items))
    report.notes.extend(ctx.notes)
    result.convfx_report = report  # type: ignore[assignment]
    setattr(result, PARTS_ATTR, out.split.to_dict())
    log.info("compressed the parts of %s: conv MACs %s -> %s (%.2fx), %d layers factorized in %.2fs",
             type(model).__name__, f"{report.conv_macs_before:,}", f"{report.conv_macs_after:,}",
             report.conv_reduction, len(report.factorized), report.seconds)
    return result


def analyze_untraced(model: nn.Module, inputs: tuple[Any, ...], assumptions: list[str]) -> Any:
    """:func:`convfx.analyze` for a model whose root cannot be traced: counted as it runs eagerly."""
    from .api import Analysis, LayerStats

    check_tensors(model)
    calls = count_calls(model, inputs)
    layers = [LayerStats(c.fqn, c.op, c.in_shape, c.out_shape, c.weight_shape, c.macs) for c in calls]
    conv = sum(c.macs for c in calls if c.kind == "conv")
    return Analysis(conv_macs=conv, total_macs=sum(c.macs for c in calls), params=count_params(model),
                    layers=layers, input_shapes=_input_shapes(inputs),
                    assumptions=[*assumptions, mac_convention(calls)])
