"""The fit and rewrite stages for per-layer factorizations (tucker, cp, svd).

Three ways to get factor weights, by what the caller has:

* no data: decompose each kernel (:func:`passes.factors.decompose_weights`);
* calibration data: fit layer by layer, each on the inputs of the already-compressed
  prefix (:func:`fit_sequentially`), so later layers absorb earlier layers' errors;
* calibration data and several allocations: fit each on a copy of the graph and keep the
  one whose outputs stay closest to the original's (:func:`best_allocation`).
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .batches import Batch
from .calibrate import Frontier, bn_output_scale, collect_moments, fit_factors, output_discrepancy
from .context import Allocation, Context
from .convs import Site, find_sites
from .decompose import relative_error
from .errors import ConvfxError
from .factors import FactorPlan, decompose_weights, max_ranks
from .flops import eval_mode
from .outcome import site_row
from .ranks import RankSpec, select_ranks
from .rewrite import FactorizedSite, factorize_sites

__all__ = ["explicit_plans", "fit_allocations", "fit_sequentially", "best_allocation", "discrepancy",
           "round_plans", "FitResult"]

log = logging.getLogger("convfx")

Plans = dict[str, FactorPlan | str]


class FitResult:
    """Per layer: weight-space error, output error on calibration data, fitted factor weights."""

    def __init__(self) -> None:
        self.errors: dict[str, float] = {}
        self.out_errors: dict[str, float] = {}
        self.fitted: dict[str, list[torch.Tensor]] = {}


def round_plans(sites: list[Site], plans: Plans, rank: RankSpec, multiple: int) -> Plans:
    """Round non-explicit ranks up to ``multiple`` (capped at the full rank)."""
    out = dict(plans)
    for site in sites:
        p = plans[site.fqn]
        value = rank.get(site.fqn) if isinstance(rank, Mapping) else rank
        if not isinstance(p, FactorPlan) or (isinstance(value, (int, tuple)) and not isinstance(value, bool)):
            continue
        limits = max_ranks(site.geometry, p.method)
        ranks = tuple(min(lim, multiple * math.ceil(r / multiple)) for r, lim in zip(p.ranks, limits))
        out[site.fqn] = FactorPlan(p.method, ranks)
    return out


def explicit_plans(ctx: Context) -> list[Allocation]:
    """Rank source ``"explicit"``: the ranks the caller gave (or VBMF/energy rules), per layer."""
    o = ctx.options
    plans = select_ranks(ctx.chosen, o.method, o.rank)
    if o.rank_multiple > 1:
        plans = round_plans(ctx.chosen, plans, o.rank, o.rank_multiple)
    return [Allocation("", plans)]


def _bar(progress: bool) -> dict[str, Any]:
    return {"disable": not progress or None, "leave": False}


def fit_sequentially(gm: fx.GraphModule, ref: fx.GraphModule, sites: list[Site], plans: dict[str, FactorPlan],
                     batches: list[Batch], result: FitResult, progress: bool, shrink: float) -> list[FactorizedSite]:
    """Fit and rewrite one layer at a time, each on the inputs of the compressed prefix."""
    done: list[FactorizedSite] = []
    todo = [s for s in sites if s.fqn in plans]
    ref_names = {n.name for n in ref.graph.nodes}
    with eval_mode(gm), eval_mode(ref), torch.no_grad():
        f_ref = [Frontier(ref, b) for b in batches]
        f_cur = [Frontier(gm, b) for b in batches]
        for site in tqdm(todo, desc="calibrating", **_bar(progress)):
            plan = plans[site.fqn]
            name = site.nodes[0].name
            if name not in ref_names:
                raise ConvfxError("cannot match this layer between the original and compressed graphs",
                                  where=site.fqn)
            if len(site.nodes) > 1:  # shared layer: fit from its weights only
                ws, result.errors[site.fqn] = decompose_weights(site.weight, site.bias, site.geometry, plan)
            else:
                st = collect_moments(f_ref, f_cur, name, site.geometry)
                if not float(torch.diagonal(st.c_oo).sum()) > 0:
                    raise ConvfxError("the calibration inputs reach this layer with zero energy (all-zero "
                                      "images?): there is nothing to fit its factors to", where=site.fqn,
                                      hint="calibrate on real inputs, or compress without calibration")
                cp_init = None
                if plan.method == "cp":
                    cp_init, _ = decompose_weights(site.weight, site.bias, site.geometry, plan)
                ws, w_hat, out_err = fit_factors(site.weight, site.geometry, plan.method, plan.ranks, st, cp_init,
                                                 out_scale=bn_output_scale(gm, site.nodes[0]), shrink=shrink)
                result.errors[site.fqn] = relative_error(site.weight, w_hat)
                result.out_errors[site.fqn] = out_err
            result.fitted[site.fqn] = ws
            done += factorize_sites(gm, [site], {site.fqn: plan}, lambda _s, _p, ws=ws: ws)
    return done


def discrepancy(gm: fx.GraphModule, batches: list[Batch], targets: list[Any]) -> float:
    """Mean output discrepancy of ``gm`` from the original's outputs (inf if not comparable)."""
    total = 0.0
    with eval_mode(gm), torch.no_grad():
        for batch, y0 in zip(batches, targets):
            y = gm(*batch)
            if not (isinstance(y0, torch.Tensor) and isinstance(y, torch.Tensor)):
                return math.inf
            total += output_discrepancy(y, y0)
    return total / max(len(batches), 1)


def _same_sites(gm: fx.GraphModule, like: list[Site]) -> list[Site]:
    """The sites of a copy of the graph that ``like`` came from, in the same order."""
    by_fqn = {s.fqn: s for s in find_sites(gm)[0]}
    return [by_fqn[s.fqn] for s in like]


def _factor_plans(plans: Plans) -> dict[str, FactorPlan]:
    return {fqn: p for fqn, p in plans.items() if isinstance(p, FactorPlan)}


def best_allocation(ctx: Context, allocations: list[Allocation]) -> tuple[Allocation, FitResult, str]:
    """Fit every allocation on a copy of the graph; keep the one closest to the original.

    Returns it, its fit (errors and factor weights) and a report note.
    """
    assert ctx.ref is not None
    o = ctx.options
    with eval_mode(ctx.ref), torch.no_grad():
        targets = [ctx.ref(*b) for b in ctx.batches]
    trials = []
    for alloc in allocations:
        trial = copy.deepcopy(ctx.gm)
        result = FitResult()
        fit_sequentially(trial, ctx.ref, _same_sites(trial, ctx.chosen), _factor_plans(alloc.plans), ctx.batches,
                         result, o.progress, o.calibration_shrink)
        trials.append((discrepancy(trial, ctx.batches, targets), alloc, result))
        del trial
    _, kept, result = min(trials, key=lambda t: t[0])
    what = "latency_target" if o.latency_target is not None else "flops_target"
    note = (f"{what}: allocations fitted under " + ", ".join(
        f"{a.label} sensitivities (calibration output discrepancy {d:.4g})" for d, a, _ in trials)
        + f"; kept {kept.label}")
    log.info(note)
    return kept, result, note


def fit_allocations(ctx: Context, allocations: list[Allocation]) -> None:
    """Fit stage for factor plans: realise the (best) allocation in the graph and report each layer."""
    o = ctx.options
    gm = ctx.gm
    calibrated = bool(ctx.batches) and ctx.ref is not None
    kept = allocations[0]
    result = FitResult()
    if calibrated and len(allocations) > 1:
        kept, result, note = best_allocation(ctx, allocations)
        ctx.notes.append(note)
    plans = kept.plans
    ctx.latency = kept.info.get("latency", ctx.latency)
    if calibrated and len(allocations) > 1:
        ctx.done = factorize_sites(gm, ctx.chosen, _factor_plans(plans), lambda site, _plan: result.fitted[site.fqn])
    elif calibrated:
        assert ctx.ref is not None
        ctx.done = fit_sequentially(gm, ctx.ref, ctx.chosen, _factor_plans(plans), ctx.batches, result, o.progress,
                                    o.calibration_shrink)
    else:
        def weights(site: Site, plan: FactorPlan) -> list[torch.Tensor]:
            ws, result.errors[site.fqn] = decompose_weights(site.weight, site.bias, site.geometry, plan)
            return ws

        todo = _factor_plans(plans)  # decompositions take minutes on large nets (CP-ALS): show progress
        bar = tqdm([s for s in ctx.chosen if s.fqn in todo], desc="decomposing", **_bar(o.progress))
        ctx.done = factorize_sites(gm, bar, todo, weights)  # type: ignore[arg-type]
    for site in ctx.chosen:
        p = plans[site.fqn]
        plan = p if isinstance(p, FactorPlan) else None
        ctx.rows.append(site_row(site, plan, None if plan else str(p), result.errors.get(site.fqn),
                                 "data" if site.fqn in result.out_errors else "weights",
                                 result.out_errors.get(site.fqn)))
