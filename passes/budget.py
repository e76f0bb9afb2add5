"""The budget rank source: candidates → cost → allocate, per layer, to a global target.

Each selected layer gets a curve of candidate plans with a predicted error (from spectra,
weighted by calibration statistics when there are any, :func:`passes.allocate.layer_candidates`);
a registered *cost* (:data:`COSTS`) prices every candidate and sets the budget; the
convex-hull allocation (:func:`passes.allocate.allocate`) then picks one plan per layer.

With calibration data each layer's error curve is further weighted by a measured
sensitivity, under two models of it (isotropic noise on the layer's output,
:func:`passes.calibrate.noise_sensitivity`, and the layer's own predicted truncations,
:func:`passes.calibrate.probe_sensitivity`). Neither predicts well on every network, so
both allocations are returned and the fit keeps the one that reproduces the original
best (:func:`passes.fit.best_allocation`). ``method="auto"`` allocates over tucker and cp
candidates on one curve and, because the cp prediction is optimistic, also over tucker
alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from tqdm.auto import tqdm

from .allocate import AUTO_METHODS, Candidate, allocate, layer_candidates, predicted_kernel, probe_points
from .batches import first_images
from .calibrate import ChannelStats, bn_output_scale, channel_stats, noise_sensitivity, probe_sensitivity
from .context import Allocation, Context
from .errors import ConvfxError
from .flops import eval_mode
from .meta import IN_SHAPE
from .ranks import layer_method, skip_reason
from .speed import LatencyCost

__all__ = ["Cost", "MacCost", "COSTS", "budget_allocations", "SENSITIVITY_IMAGES"]

#: Calibration images on which each layer's predicted error curve is checked against the
#: harm it does at the model's output (a few forward passes per layer).
SENSITIVITY_IMAGES = 32

Curves = dict[str, list[Candidate]]


@dataclass
class Priced:
    """Curves priced by a cost, the budget, what the layers outside the curves cost, and
    why a layer whose curve holds only "keep it" is kept (when the cost knows better than
    "the allocation kept it")."""

    curves: Curves
    budget: float
    fixed: float
    reasons: dict[str, str] = field(default_factory=dict)


class Cost(Protocol):
    """What a candidate costs and how much may be spent: the allocation's objective."""

    #: The option that sets the target, named in errors.
    what: str
    #: What is counted, as errors and notes say it.
    unit: str

    def price(self, ctx: Context, curves: Curves) -> Priced:
        """Set each candidate's cost and derive the budget from the options' target."""
        ...

    def choose(self, ctx: Context, curves: Curves, budget: float, fixed: float, skip: Mapping[str, Any]
               ) -> tuple[dict[str, Candidate], dict[str, Any]]:
        """One candidate per layer within the budget, and what the report should know of it."""
        ...


class MacCost:
    """Conv MACs (fvcore's count), budget ``flops_target`` × the original's conv MACs."""

    what = "flops_target"
    unit = "conv MACs"

    def price(self, ctx: Context, curves: Curves) -> Priced:
        target = float(ctx.options.flops_target)  # type: ignore[arg-type]
        fixed = ctx.conv_before - sum(cands[0].macs for cands in curves.values())
        return Priced(curves, int(math.floor(target * ctx.conv_before)), fixed)

    def choose(self, ctx: Context, curves: Curves, budget: float, fixed: float, skip: Mapping[str, Any]
               ) -> tuple[dict[str, Candidate], dict[str, Any]]:
        return allocate(curves, budget, fixed, what=self.what, unit=self.unit), {}


#: Registered costs by :attr:`passes.options.CompressOptions.objective`.
COSTS: dict[str, Cost] = {"macs": MacCost(), "latency": LatencyCost()}


def _skip_plans(ctx: Context) -> dict[str, Any]:
    """Layers that get no curve, with the reason; raises on weights that cannot be factorized."""
    plans: dict[str, Any] = {}
    for site in ctx.chosen:
        reason = skip_reason(site.geometry)
        if reason is not None:
            plans[site.fqn] = reason
            continue
        if not bool(torch.isfinite(site.weight).all()):
            raise ConvfxError("weights contain NaN or inf; cannot factorize", where=site.fqn)
        if site.geometry.linear:
            plans[site.fqn] = "Linear layers are not part of the conv-MAC budget; give them a rank instead"
    return plans


def candidates(ctx: Context, stats: dict[str, ChannelStats], scales: dict[str, torch.Tensor | None],
               skip: dict[str, Any]) -> Curves:
    """Each planned layer's candidates (MACs summed over its calls, predicted error²)."""
    curves: Curves = {}
    for site in ctx.chosen:
        if site.fqn in skip:
            continue
        in_shape = tuple(site.nodes[0].meta[IN_SHAPE])
        n_calls = len(site.nodes)
        st = stats.get(site.fqn)
        cands = layer_candidates(site, layer_method(site.geometry, ctx.options.method), in_shape,
                                 st.c_in if st else None, st.c_out if st else None, ctx.options.rank_multiple,
                                 scales[site.fqn])
        curves[site.fqn] = [Candidate(c.plan, c.macs * n_calls, c.err2) for c in cands]
    return curves


def _families(method: str, curves: Curves) -> dict[str, Curves]:
    """The curves to allocate over, labelled: for ``auto`` the mixed ones and tucker alone."""
    if method != "auto":
        return {"": curves}
    return {"+".join(AUTO_METHODS) + " ": curves,
            "tucker ": {fqn: [c for c in cs if c.plan is None or c.plan.method != "cp"] for fqn, cs in curves.items()}}


def _bar(progress: bool, what: str) -> Callable[[Any], Any]:
    return lambda items: tqdm(items, desc=what, disable=not progress or None, leave=False)


def sensitivities(ctx: Context, curves: Curves, stats: dict[str, ChannelStats],
                  scales: dict[str, torch.Tensor | None], noise: dict[str, float] | None = None
                  ) -> dict[str, dict[str, float]]:
    """Per-layer sensitivity under each model, measured on the first calibration images.

    ``noise`` passes in a noise sensitivity already measured (it does not depend on the curves).
    """
    assert ctx.ref is not None
    by_fqn = {s.fqn: s for s in ctx.chosen}
    sample = first_images(ctx.batches, SENSITIVITY_IMAGES)
    node_to_site = {n.name: s.fqn for s in ctx.chosen for n in s.nodes if s.fqn in curves}
    probes = {fqn: [(c.err2, predicted_kernel(by_fqn[fqn].weight, c.plan, stats[fqn].c_in, stats[fqn].c_out,
                                              scales[fqn], by_fqn[fqn].geometry))
                    for c in probe_points(cands) if c.plan is not None]
              for fqn, cands in curves.items() if fqn in stats}
    progress = ctx.options.progress
    with eval_mode(ctx.gm), eval_mode(ctx.ref):
        if noise is None:
            noise = noise_sensitivity(ctx.ref, node_to_site, sample, scales, wrap=_bar(progress, "sensitivity (noise)"))
        return {"noise": noise,
                "probe": probe_sensitivity(ctx.gm, probes, sample, node_to_site,
                                           wrap=_bar(progress, "sensitivity (probes)"))}


def budget_allocations(ctx: Context) -> list[Allocation]:
    """Rank source ``"budget"``: one or more labelled allocations to the options' target.

    Without data there is one, from the spectra; with calibration data one per sensitivity
    model (and, for ``auto``, per family of structures); identical ones are dropped.
    """
    gm, sites = ctx.gm, ctx.chosen
    stats: dict[str, ChannelStats] = {}
    scales = {s.fqn: bn_output_scale(gm, s.nodes[0]) if len(s.nodes) == 1 else None for s in sites}
    calibrated = ctx.ref is not None and bool(ctx.batches)
    if calibrated:
        assert ctx.ref is not None
        node_to_site = {n.name: s.fqn for s in sites for n in s.nodes if skip_reason(s.geometry) is None}
        with eval_mode(ctx.ref):
            stats = channel_stats(ctx.ref, node_to_site, ctx.batches)
    skip = _skip_plans(ctx)
    cost = COSTS[ctx.options.objective]
    priced = cost.price(ctx, candidates(ctx, stats, scales, skip))
    noise: dict[str, float] | None = None
    out: list[Allocation] = []
    for family, curves in _families(ctx.options.method, priced.curves).items():
        models: dict[str, dict[str, float]] = {"spectra": {}}
        if stats and calibrated:
            models = sensitivities(ctx, curves, stats, scales, noise)
            noise = models["noise"]
        for label, sens in models.items():
            weighted = {fqn: [Candidate(c.plan, c.macs, c.err2 * sens.get(fqn, 1.0), c.cost) for c in cands]
                        for fqn, cands in curves.items()}
            chosen, info = cost.choose(ctx, weighted, priced.budget, priced.fixed, skip)
            plans = dict(skip)
            for fqn, cand in chosen.items():
                plans[fqn] = (cand.plan if cand.plan is not None
                              else priced.reasons.get(fqn, f"{cost.what} allocation kept it at full cost"))
            if all(plans != other.plans for other in out):
                out.append(Allocation(family + label, plans, info))
    return out
