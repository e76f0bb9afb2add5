"""The public entry points: :func:`compress` and :func:`analyze`.

``compress`` builds one validated :class:`~passes.options.CompressOptions`, runs the pass
pipeline (:func:`passes.pipeline.run`: trace → analyze → select → plan → fit + rewrite)
and turns what it did into a :class:`~convfx.report.Report`. The passes live in
:mod:`passes`; this module only resolves inputs, builds options and reports.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from passes.batches import param_ref
from passes.calibrate import SHRINK
from passes.context import Context
from passes.flops import annotate_macs, fvcore_macs, propagate_shapes
from passes.meta import IN_SHAPE, MACS, OUT_SHAPE
from passes.errors import ConvfxError
from passes.options import CompressOptions, FilterFn, default_filter
from passes.parts import root_failure
from passes.pipeline import check_tensors, count_params, run
from passes.ranks import RankSpec
from passes.trace import UNTRACEABLE_ROOT, trace

from .parts import analyze_untraced, compress_untraced
from .report import Report

__all__ = ["compress", "compress_with", "analyze", "Analysis", "LayerStats", "CompressOptions", "default_filter",
           "infer_example_inputs"]

log = logging.getLogger("convfx")


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ValueError("example_inputs: expected a tensor or a tuple of tensors, "
                     f"got {type(example_inputs).__name__}")


def infer_example_inputs(model: nn.Module) -> tuple[tuple[torch.Tensor, ...], str]:
    """An image-shaped input (1, C_in of the first conv, 224, 224) and the stated assumption."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError("example_inputs: required for this model (it has no nn.Conv2d to infer an "
                         "image input from)")
    ref = param_ref(model)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    x = torch.randn(1, first.in_channels, 224, 224, dtype=dtype, device=device)
    note = (f"no example_inputs given: assumed one image of shape (1, {first.in_channels}, 224, 224) "
            "from the first conv; MAC counts depend on this input size")
    log.info(note)
    return (x,), note


def _resolve_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], list[str]]:
    if example_inputs is None:
        inputs, note = infer_example_inputs(model)
        return inputs, [note]
    return _as_tuple(example_inputs), []


def _report(ctx: Context, seconds_from: float) -> Report:
    """The report of a pipeline run: its rows, fvcore's totals after, and the notes."""
    o, gm = ctx.options, ctx.gm
    conv_after, total_after = fvcore_macs(gm, ctx.inputs)
    report = Report(
        layers=ctx.rows, conv_macs_before=ctx.conv_before, conv_macs_after=conv_after,
        total_macs_before=ctx.total_before, total_macs_after=total_after,
        params_before=ctx.params_before, params_after=count_params(gm),
        input_shapes=[tuple(x.shape) for x in ctx.inputs if isinstance(x, torch.Tensor)],
        method=o.method, rank=o.rank_label, assumptions=ctx.assumptions,
        seconds=time.perf_counter() - seconds_from, widths=dict(ctx.widths),
        latency=_latency(ctx),
    )
    if ctx.batches:
        n_img = sum(int(b[0].shape[0]) for b in ctx.batches if isinstance(b[0], torch.Tensor))
        report.notes.append(f"factors fitted on {len(ctx.batches)} calibration batch(es), {n_img} input(s)")
    report.notes.extend(ctx.notes)
    if o.method == "auto" and not ctx.batches:
        report.notes.append("method=auto without calibration: each layer's structure was chosen from predicted "
                            "errors alone, and the cp prediction is a lower bound; calibration checks it")
    if ctx.traced is not None and ctx.traced.leaf_fallbacks:
        report.notes.extend(f"{k!r} kept as an untraced leaf: {v}" for k, v in ctx.traced.leaf_fallbacks.items())
    return report


def _latency(ctx: Context) -> dict[str, Any] | None:
    """The latency objective's measurements, for the report; per-layer times go on the rows."""
    lat = ctx.latency
    if lat is None:
        return None
    for row in ctx.rows:
        if row.fqn in lat.layer_ms:
            row.ms_before, row.ms_after = lat.layer_ms[row.fqn]
    if lat.note:
        ctx.notes.append(lat.note)
    return {"target": lat.target, "backend": lat.backend, "device": lat.device, "original_ms": lat.original_ms,
            "original_spread_ms": lat.original_spread_ms, "compressed_ms": lat.compressed_ms,
            "compressed_spread_ms": lat.compressed_spread_ms, "measured_speedup": lat.measured_speedup,
            "predicted_speedup": lat.predicted_speedup, "reached": lat.reached,
            "rounds": [list(r) for r in lat.rounds]}


def compress_with(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any] | None,
                  options: CompressOptions) -> fx.GraphModule | nn.Module:
    """:func:`compress` with a prepared :class:`CompressOptions` (what the CLI and backend build)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(options, CompressOptions):
        raise ValueError(f"options: expected a CompressOptions, got {type(options).__name__}")
    t0 = time.perf_counter()
    inputs, assumptions = _resolve_inputs(model, example_inputs)
    root = root_failure(model, inputs)
    if root is not None:  # detectors, RAFT, ...: the traceable parts, in the user's model (convfx.parts)
        return compress_untraced(model, inputs, options, assumptions, root, t0)
    ctx = run(model, inputs, options, assumptions)
    gm = ctx.gm
    report = _report(ctx, t0)
    gm.convfx_report = report  # type: ignore[assignment]
    log.info("compressed %s: conv MACs %s -> %s (%.2fx), %d layers factorized in %.2fs",
             type(model).__name__, f"{report.conv_macs_before:,}", f"{report.conv_macs_after:,}",
             report.conv_reduction, len(report.factorized), report.seconds)
    return gm


def compress(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
    *,
    method: str = "tucker",
    rank: RankSpec = "vbmf",
    filter_fn: FilterFn | None = None,
    inplace: bool = False,
    calibration: Any = None,
    flops_target: float | None = None,
    rank_multiple: int = 1,
    calibration_batches: int | None = None,
    calibration_shrink: float = SHRINK,
    refine_steps: int = 0,
    latency_target: float | None = None,
    latency_backend: str = "inductor",
    distill_steps: int = 0,
    distill_augment: Any = "default",
    progress: bool = True,
) -> fx.GraphModule | nn.Module:
    """Replace the convolutions of ``model`` by low-rank factorizations.

    Returns a ``torch.fx.GraphModule`` whose factors live under the original layer names
    (``layer1.0.conv2.0``, ``.1``, ``.2``) and whose ``convfx_report`` lists every conv.
    When the root ``forward`` itself cannot be traced (torchvision detectors, RAFT, ...),
    returns the user's model instead (a copy unless ``inplace``: an ``nn.Module``, not a
    GraphModule) with its largest traceable submodules compressed in place
    (:mod:`passes.parts`); the report then covers every conv of the whole model and names
    the parts traced and not. Every argument is checked (:class:`CompressOptions`) before
    the model is traced.

    Args:
        model: any module; what ``torch.fx`` cannot trace is left as it is (untraceable
            submodules are kept as leaves, an untraceable root is compressed part by part)
            and its convs reported as skipped.
        example_inputs: a tensor or a tuple of the forward's positional arguments, e.g.
            ``([image],)`` for a torchvision detector (one argument: a list of images);
            without it an image of shape (1, C_in, 224, 224) is assumed from the first conv
            and the report says so.
        method: ``"tucker"`` (Tucker-2), ``"cp"`` or ``"svd"``. 1x1 convs always use SVD.
            A Tucker factor at full channel rank is folded into the core (one layer less).
            ``"auto"`` (with ``flops_target``) lets the allocation pick tucker or cp per layer
            (:data:`passes.allocate.AUTO_METHODS`); with calibration the tucker-only allocation
            is fitted too and kept when it reproduces the original better.
            ``"id"`` (with ``flops_target`` and ``calibration``) instead narrows the hidden
            channels between a conv and a 1x1 conv joined only by channel-wise ops (BN,
            activations, depthwise convs: inverted-residual blocks) and refits the 1x1 conv by
            least squares (:mod:`passes.narrow`); other convs are reported as kept.
        rank: ``"vbmf"``, ``"energy:0.9"``, an int, a ``(r_out, r_in)`` tuple, a float in
            (0, 1] or a dict ``{fqn: any of those}``. See :mod:`passes.ranks`.
        filter_fn: ``filter_fn(module, fqn) -> bool`` selecting layers; default: every
            ``nn.Conv2d``. Return True for an ``nn.Linear`` to factorize it by SVD.
        inplace: reuse (and modify) ``model``'s modules instead of working on a copy.
        calibration: a DataLoader or any iterable of batches (tensors, or tuples whose
            first item is the input; for a model whose root cannot be traced, items shaped
            like ``example_inputs``, see :func:`passes.parts.item_args`: a detector's item
            is a list of images). Factors are then fitted to reproduce each layer's
            outputs on these activations, layer by layer on the already-compressed prefix.
            A few hundred to a few thousand images suffice; memory is O(D²) per layer.
        flops_target: a fraction f in (0, 1]: ranks are allocated across layers so that the
            conv MACs (fvcore count) are at most f × the original's (the whole model's, also
            when only its parts are compressed). Replaces ``rank``. With
            ``calibration``, allocations under two sensitivity models are both fitted and the
            one closest to the original on the calibration data is kept (see the report's notes).
        rank_multiple: round automatic, fractional and allocated ranks up to a multiple of
            this (8 or 16 help real kernels); explicit integer ranks are kept as given.
        calibration_batches: use at most this many calibration batches.
        calibration_shrink: pull the data fit towards the weight-space fit, as if
            ``calibration_shrink`` x (the calibration energy) of isotropic inputs were added
            (:meth:`passes.calibrate.MomentStats.shrunk`). A few hundred images otherwise
            over-fit the directions they barely excite. 0 is the pure data fit.
        refine_steps: with ``method="id"``, after each chain's least-squares refit, train all
            of the narrowed chain's weights for this many Adam steps to reproduce the original
            chain's output on the calibration activations: a local, label-free fit,
            not fine-tuning (:func:`passes.interp.refine_chain`). 0 (default) keeps the refit alone.
        latency_target: a fraction f in (0, 1] of the original model's *measured* time on
            ``example_inputs`` (their device, batch, dtype and memory layout): ranks are
            allocated on measured per-layer cost curves, then the whole model is measured
            beside the original and the allocation corrected until it runs in f × the
            original's time (:mod:`passes.speed`). Replaces ``flops_target`` (not both). The
            result is never slower than the original as measured; when f cannot be reached it
            is the fastest model found, and the report says so. Layer times are cached in
            ``$CONVFX_CACHE_DIR`` (default ``$XDG_CACHE_HOME/convfx``).
        latency_backend: how the model will run: ``"inductor"`` (``torch.compile``) or ``"eager"``.
        distill_steps: after fitting, train the whole compressed network for this many steps
            to reproduce the original model's outputs on the calibration inputs (label-free:
            the original is the teacher; labels in the batches are never read). A fifth of
            the calibration images is held out and picks the weights returned (early
            stopping), so the result is never worse than the fit on images it did not train
            on (:mod:`passes.recover`). 0 (default) skips it. Needs ``calibration``.
        distill_augment: ``"default"`` (flips and padded random crops of image batches),
            ``None``, or a callable ``(batch) -> batch``.
        progress: show a progress bar while fitting layers.

    Example:
        >>> import torchvision
        >>> gm = compress(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224), rank=0.5)
        >>> gm.convfx_report.conv_reduction > 1
        True
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    options = CompressOptions(
        method=method, rank=rank, filter_fn=filter_fn, inplace=inplace, calibration=calibration,
        flops_target=flops_target, rank_multiple=rank_multiple, calibration_batches=calibration_batches,
        calibration_shrink=calibration_shrink, refine_steps=refine_steps, latency_target=latency_target,
        latency_backend=latency_backend, distill_steps=distill_steps, distill_augment=distill_augment,
        progress=progress)
    return compress_with(model, example_inputs, options)


@dataclass
class LayerStats:
    """One conv/linear call in an analysed model (fvcore-convention MACs)."""

    fqn: str
    op: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    macs: int


@dataclass
class Analysis:
    """MACs (1 multiply-add = 1, fvcore) and parameters of a model on given inputs."""

    conv_macs: int
    total_macs: int
    params: int
    layers: list[LayerStats] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def conv_gflops(self) -> float:
        """Conv GFLOPs in the 2 × MACs convention."""
        return 2 * self.conv_macs / 1e9


def analyze(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any] | None = None) -> Analysis:
    """Count MACs (fvcore) and parameters of a plain module or a compressed GraphModule.

    A model whose root cannot be traced is counted as it runs eagerly, conv and Linear
    calls only (:func:`convfx.parts.analyze_untraced`).

    >>> a = analyze(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 10, 10))
    >>> a.conv_macs == 8 * 3 * 3 * 3 * 8 * 8
    True
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_tensors(model)
    inputs, assumptions = _resolve_inputs(model, example_inputs)
    try:
        gm = trace(model).gm
    except ConvfxError as err:
        if err.kind != UNTRACEABLE_ROOT:
            raise
        return analyze_untraced(model, inputs, assumptions)
    propagate_shapes(gm, inputs)
    annotate_macs(gm)
    conv, total = fvcore_macs(model, inputs)
    layers: list[LayerStats] = []
    for node in gm.graph.nodes:
        if MACS not in node.meta:
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            fqn, op, wshape = str(node.target), type(mod).__name__, tuple(mod.weight.shape)
        else:
            w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            fqn = str(w.target).rsplit(".", 1)[0]
            op, wshape = "conv2d", tuple(gm.get_parameter(str(w.target)).shape)
        layers.append(LayerStats(fqn, op, tuple(node.meta[IN_SHAPE]), tuple(node.meta[OUT_SHAPE]), wshape,
                                 int(node.meta[MACS])))
    return Analysis(conv_macs=conv, total_macs=total, params=count_params(model), layers=layers,
                    input_shapes=[tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
                    assumptions=assumptions)
