"""``compress`` as a pipeline of small passes over one shared :class:`~passes.context.Context`.

    trace → analyze → select → plan (candidates → cost → allocate) → fit + rewrite → recover → rows

Where plans come from is a registered *rank source* (:data:`RANK_SOURCES`): explicit
ranks (:func:`passes.fit.explicit_plans`), a budget allocation over per-layer
error/cost curves (:func:`passes.budget.budget_allocations`, costs in
:data:`passes.budget.COSTS`), or ``method="id"``'s channel widths
(:func:`passes.narrow.plan_widths`); each comes with the fit that realises its plans. A
new method or objective is one registered function and one
:class:`~passes.options.CompressOptions` field.

Fit and rewrite interleave when calibrating: each layer is fitted on the inputs of the
already-rewritten prefix.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .batches import calibration_batches
from .budget import budget_allocations
from .context import Allocation, Context
from .convs import SkippedLayer, find_sites, get_submodule_or_none, set_submodule
from .errors import ConvfxError
from .fit import explicit_plans, fit_allocations
from .flops import annotate_macs, eval_mode, fvcore_macs, propagate_shapes
from .narrow import fit_widths, plan_widths
from .options import CompressOptions
from .outcome import site_row, skipped_row
from .recover import distill
from .trace import is_plain_conv, trace

__all__ = ["RankSource", "RANK_SOURCES", "register_rank_source", "run", "count_params", "STAGES", "check_tensors"]

log = logging.getLogger("convfx")

Planner = Callable[[Context], list[Allocation]]
Fitter = Callable[[Context, list[Allocation]], None]


@dataclass(frozen=True)
class RankSource:
    """Where plans come from (``plan``) and how they are realised in the graph (``fit``)."""

    plan: Planner
    fit: Fitter


#: Rank sources by :attr:`CompressOptions.rank_source`.
RANK_SOURCES: dict[str, RankSource] = {
    "explicit": RankSource(explicit_plans, fit_allocations),
    "budget": RankSource(budget_allocations, fit_allocations),
    "id": RankSource(plan_widths, fit_widths),
}


def register_rank_source(name: str, plan: Planner, fit: Fitter) -> None:
    """Make ``name`` a rank source that :attr:`CompressOptions.rank_source` can name."""
    RANK_SOURCES[name] = RankSource(plan, fit)


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# --------------------------------------------------------------------------- stages
def check_tensors(model: nn.Module, finite: bool = False) -> None:
    """A model convfx can run: real tensors (not on the meta device), finite ones if asked.

    Why: a meta-device model or NaN BatchNorm statistics otherwise fail deep inside fvcore
    or an eigensolver, with messages that never name the model or the module.
    """
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise ConvfxError(f"{name} is on the meta device: the model holds no values", where="model",
                              hint="materialise it first, e.g. model.to_empty(device='cpu') then load its weights")
    if not finite:
        return
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            module, _, attr = name.rpartition(".")
            raise ConvfxError(f"{attr} contains NaN or inf; the calibration fits would be NaN",
                              where=module or type(model).__name__)


def check_model(ctx: Context) -> None:
    """Real tensors; finite ones when calibrating (the fits would be NaN)."""
    check_tensors(ctx.model, finite=ctx.options.calibration is not None)


def load_calibration(ctx: Context) -> None:
    """Materialise the calibration inputs once, each batch checked against the example input."""
    o = ctx.options
    like = next((x for x in ctx.inputs if isinstance(x, torch.Tensor)), None)
    ctx.batches = calibration_batches(o.calibration, ctx.model, o.calibration_batches, like)
    with torch.no_grad(), eval_mode(ctx.model):
        for i, (x,) in enumerate(ctx.batches):  # one input of each: does the model run on it?
            try:
                ctx.model(x[:1])
            except Exception as err:  # noqa: BLE001 - re-raised naming the batch
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ConvfxError(f"batch {i} (shape {tuple(x.shape)}) does not fit the model: "
                                  f"{type(err).__name__}: {first}", where="calibration") from err


def trace_model(ctx: Context) -> None:
    """Trace the model (or a copy of it); with calibration data also the untouched original."""
    ctx.src = ctx.model if ctx.options.inplace else copy.deepcopy(ctx.model)
    ctx.traced = trace(ctx.src)
    ctx.ref = trace(ctx.model).gm if ctx.batches else None


def analyze(ctx: Context) -> None:
    """Shapes and MACs into ``node.meta``; fvcore's model totals before any change."""
    gm = ctx.gm
    propagate_shapes(gm, ctx.inputs)
    annotate_macs(gm)
    ctx.conv_before, ctx.total_before = fvcore_macs(gm, ctx.inputs)
    ctx.params_before = count_params(gm)


def owner(ctx: Context, fqn: str) -> nn.Module:
    """The module that owns a site's weight, as the user's ``filter_fn`` sees it."""
    assert ctx.src is not None
    found = get_submodule_or_none(ctx.src, fqn)
    return found if found is not None else ctx.gm.get_submodule(fqn)


def select(ctx: Context) -> None:
    """Every conv call in the graph; those ``filter_fn`` selects go on to be planned."""
    ctx.sites, ctx.skipped = find_sites(ctx.gm)
    rank = ctx.options.rank
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - {s.fqn for s in ctx.sites})
        if unknown:
            raise ValueError(f"rank: dict names layer(s) that are not factorizable convs in this model: "
                             f"{unknown[:5]}")
    chosen_fn = ctx.options.select
    for site in ctx.sites:
        mod = owner(ctx, site.fqn)
        if not chosen_fn(mod, site.fqn):
            if site.kind != "linear":
                ctx.rows.append(site_row(site, None, "excluded by filter_fn"))
            continue
        if site.kind == "linear" and type(mod) is not nn.Linear:
            continue
        ctx.chosen.append(site)


def recover(ctx: Context) -> None:
    """Label-free distillation of the whole compressed net from the original (``distill_steps``).

    A fraction of the calibration images (``distill_holdout``) is kept out of training and
    chooses the weights returned (:func:`passes.recover.distill`). The teacher is the
    original model, copied when ``inplace`` shares its modules with the student.
    """
    o = ctx.options
    if not o.distill_steps:
        return
    pool = [b[0] for b in ctx.batches]
    n = sum(int(x.shape[0]) for x in pool)
    n_held = int(round(o.distill_holdout * n)) if n > 1 else 0
    train, held = _split_images(pool, n - n_held)
    teacher = copy.deepcopy(ctx.model) if o.inplace else ctx.model
    result = distill(ctx.gm, teacher, train, o.distill_config, progress=o.progress, held_out=held or None)
    ctx.notes.append(result.note() + (f" ({n - n_held} calibration images trained on, {n_held} held out "
                                      "to choose the weights)" if n_held else ""))


def _split_images(batches: list[Any], n_first: int) -> tuple[list[Any], list[Any]]:
    """The first ``n_first`` images of ``batches`` and the rest, as lists of batches."""
    first, rest = [], []
    for x in batches:
        k = max(0, min(int(x.shape[0]), n_first))
        if k:
            first.append(x[:k])
        if k < x.shape[0]:
            rest.append(x[k:])
        n_first -= k
    return first, rest


def _outside_graph(ctx: Context) -> list[SkippedLayer]:
    """Convs in the model that no graph node calls, each with the reason."""
    assert ctx.src is not None and ctx.traced is not None
    seen = {s.fqn for s in ctx.sites} | {s.fqn for s in ctx.skipped}
    out: list[SkippedLayer] = []
    for name, mod in ctx.src.named_modules():
        if not isinstance(mod, nn.modules.conv._ConvNd) or name in seen:
            continue
        if any(name == p or name.startswith(p + ".") for p in seen):
            continue
        leaf = next((p for p in ctx.traced.leaf_fallbacks if name == p or name.startswith(p + ".")), None)
        if leaf is not None:
            reason = (f"{leaf!r} could not be traced and is kept as a leaf" if leaf == name
                      else f"inside {leaf!r}, which could not be traced and is kept as a leaf")
        elif not is_plain_conv(mod):
            reason = "conv subclass whose forward does not call the conv function on its own weight"
        else:
            reason = "not called by the model's forward on the example inputs"
        out.append(SkippedLayer(name, reason))
    return out


def finish_rows(ctx: Context) -> None:
    """Rows for what no pass could treat, then every row in the model's module order."""
    assert ctx.src is not None
    ctx.rows.extend(skipped_row(s) for s in ctx.skipped)
    ctx.rows.extend(skipped_row(s, tuple(owner(ctx, s.fqn).weight.shape)) for s in _outside_graph(ctx))
    order = {name: i for i, (name, _) in enumerate(ctx.src.named_modules())}
    ctx.rows.sort(key=lambda r: order.get(r.fqn, len(order)))


def write_back(ctx: Context) -> None:
    """``inplace``: the caller's model gets each factor container under the layer's name.

    Only layers that are modules of the caller's model are swapped; a functional conv on
    a parameter of a larger module stays the graph's business.
    """
    if not ctx.options.inplace:
        return
    for fs in ctx.done:
        layer = get_submodule_or_none(ctx.model, fs.fqn)
        if isinstance(layer, nn.modules.conv._ConvNd | nn.Linear) and fs.container.n_factors:
            set_submodule(ctx.model, fs.fqn, fs.container)


#: The stages in order; the rank source's plan and fit run between ``select`` and ``finish_rows``.
STAGES = (check_model, load_calibration, trace_model, analyze, select)


def run(model: nn.Module, inputs: tuple[Any, ...], options: CompressOptions,
        assumptions: list[str] | None = None) -> Context:
    """Run every stage on ``model``; the compressed graph is ``ctx.gm``, its rows ``ctx.rows``."""
    ctx = Context(options, model, inputs, list(assumptions or []))
    for stage in STAGES:
        stage(ctx)
    source = RANK_SOURCES[options.rank_source]
    source.fit(ctx, source.plan(ctx))
    recover(ctx)
    finish_rows(ctx)
    write_back(ctx)
    return ctx
