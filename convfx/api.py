"""The public entry points: :func:`compress` and :func:`analyze`.

``compress`` is a small compiler: trace → shape/MAC analysis → rank selection →
factorize rewrite → recompile. Every pass lives in :mod:`passes`; this module wires them,
validates arguments and builds the report.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes.convs import Site, SkippedLayer, find_sites, set_submodule
from passes.errors import ConvfxError
from passes.allocate import AUTO_METHODS, Candidate, allocate, layer_candidates, predicted_kernel, probe_points
from passes.calibrate import (SHRINK, Frontier, bn_output_scale, channel_stats, collect_moments, fit_factors,
                              noise_sensitivity, output_discrepancy, probe_sensitivity)
from passes.decompose import relative_error
from passes.factors import METHODS, FactorPlan, decompose_weights, factor_cost, max_ranks, original_cost
from passes.flops import annotate_macs, eval_mode, fvcore_macs, propagate_shapes
from passes.interp import (Chain, allocate_widths, chain_graph, chain_macs, chain_moments, find_chains, greedy_order,
                           prune_chain, refine_chain, refit, refit_residual, skip_join)
from passes.ranks import COMPRESS_METHODS, RankSpec, layer_method, select_ranks, skip_reason, validate_rank_spec
from passes.rewrite import factorize_sites
from passes.trace import TraceResult, is_plain_conv, trace

from .report import LayerReport, Report

__all__ = ["compress", "analyze", "Analysis", "LayerStats", "default_filter", "infer_example_inputs"]

log = logging.getLogger("convfx")

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Select every 2-d convolution; Linears only when a user's ``filter_fn`` asks.

    A functional ``conv2d`` is owned by whatever module holds its weight, which need not
    be an ``nn.Conv2d``; the default selects those too.
    """
    return not isinstance(module, nn.Linear)


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ValueError("example_inputs: expected a tensor or a tuple of tensors, "
                     f"got {type(example_inputs).__name__}")


def _param_ref(model: nn.Module) -> torch.Tensor | None:
    for p in model.parameters():
        return p
    return None


def infer_example_inputs(model: nn.Module) -> tuple[tuple[torch.Tensor, ...], str]:
    """An image-shaped input (1, C_in of the first conv, 224, 224) and the stated assumption."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError("example_inputs: required for this model (it has no nn.Conv2d to infer an "
                         "image input from)")
    ref = _param_ref(model)
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


def _count_params(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _validate(method: str, rank: RankSpec, filter_fn: Any, flops_target: Any = None) -> None:
    if method not in COMPRESS_METHODS:
        raise ValueError(f"method: expected one of {COMPRESS_METHODS}, got {method!r}")
    if method == "id" and flops_target is None:
        raise ValueError("method: 'id' narrows hidden channels to a FLOP budget; pass flops_target=... "
                         "and calibration=...")
    if method == "auto" and flops_target is None:
        raise ValueError("method: 'auto' chooses each layer's structure inside the flops_target allocation; "
                         "pass flops_target=... or one of " + ", ".join(METHODS))
    validate_rank_spec(rank)
    if filter_fn is not None and not callable(filter_fn):
        raise ValueError(f"filter_fn: expected a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")


def _owner(model: nn.Module, gm: fx.GraphModule, fqn: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return gm.get_submodule(fqn)


def _conv_modules_outside_graph(model: nn.Module, seen: set[str], traced: TraceResult) -> list[SkippedLayer]:
    """Convs in the model that no graph node calls, each with the reason."""
    out: list[SkippedLayer] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.modules.conv._ConvNd) or name in seen:
            continue
        if any(name == p or name.startswith(p + ".") for p in seen):
            continue
        leaf = next((p for p in traced.leaf_fallbacks if name == p or name.startswith(p + ".")), None)
        if leaf is not None:
            reason = (f"{leaf!r} could not be traced and is kept as a leaf" if leaf == name
                      else f"inside {leaf!r}, which could not be traced and is kept as a leaf")
        elif isinstance(mod, nn.Conv2d) and not is_plain_conv(mod):
            reason = "conv subclass whose forward does not call F.conv2d on its own weight"
        else:
            reason = "not called by the model's forward on the example inputs"
        out.append(SkippedLayer(name, reason))
    return out


def _site_row(site: Site, plan: FactorPlan | None, reason: str | None, err: float | None,
              fit: str = "weights") -> LayerReport:
    shape = site.geometry
    macs_b = params_b = macs_a = params_a = 0
    for node in site.nodes:
        in_shape = tuple(node.meta["convfx_in_shape"])
        mb, pb = original_cost(shape, in_shape)
        macs_b += mb
        params_b = pb
        if plan is not None:
            ma, pa = factor_cost(shape, plan, in_shape)
            macs_a += ma
            params_a = pa
    if plan is None:
        macs_a, params_a = macs_b, params_b
    w = tuple(site.weight.shape)
    return LayerReport(
        fqn=site.fqn, kind="linear" if shape.linear else "conv", shape=w,
        kernel=None if shape.linear else shape.kernel_size, stride=None if shape.linear else shape.stride,
        method=plan.method if plan else None, ranks=plan.ranks if plan else None,
        macs_before=macs_b, macs_after=macs_a, params_before=params_b, params_after=params_a,
        rel_error=err, skipped=reason, fit=fit,
    )



def _calibration_batches(calibration: Any, model: nn.Module, limit: int | None) -> list[tuple[Any, ...]]:
    """Materialise calibration inputs once, on the model's device, whatever their source.

    A DataLoader and a generator of the same batches give the same list, so they give
    the same result. Items may be tensors or (input, label, ...) tuples.
    """
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        raise ValueError("calibration: pass an iterable of batches (a DataLoader, a list or a generator), "
                         "not a single tensor; wrap it as [tensor]")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"calibration_batches: expected a positive int, got {limit!r}")
    ref = _param_ref(model)
    device = ref.device if ref is not None else torch.device("cpu")
    out: list[tuple[Any, ...]] = []
    try:
        iterator = iter(calibration)
    except TypeError:
        raise ValueError(f"calibration: expected an iterable of batches, got {type(calibration).__name__}") from None
    for item in iterator:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"calibration: batch {len(out)} holds {type(x).__name__}, expected a tensor")
        if ref is not None and x.is_floating_point():
            x = x.to(device=device, dtype=ref.dtype)
        out.append((x,))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError("calibration: the iterable yielded no batches")
    return out


def _round_plans(sites: list[Site], plans: dict[str, FactorPlan | str], rank: RankSpec,
                 multiple: int) -> dict[str, FactorPlan | str]:
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


#: Calibration images on which each layer's predicted error curve is checked against the
#: harm it does at the model's output (a few forward passes per layer).
_SENSITIVITY_IMAGES = 32


def _allocate(gm: fx.GraphModule, sites: list[Site], method: str, target: float, conv_before: int,
              ref: fx.GraphModule | None, batches: list[tuple[Any, ...]], multiple: int, progress: bool = False
              ) -> list[tuple[str, dict[str, FactorPlan | str]]]:
    """The FLOP-budget allocation pass: per-layer error/MAC curves, then a global choice.

    Returns one or more labelled allocations. Without data there is one, from the
    spectra. With calibration data each layer's predicted error curve is weighted by a
    measured sensitivity, under two models of it (isotropic noise on the layer's output,
    :func:`passes.calibrate.noise_sensitivity`, and the layer's own truncations,
    :func:`passes.calibrate.probe_sensitivity`); neither predicts well on every network,
    so ``compress`` fits both and keeps the one that reproduces the original best.
    ``method="auto"`` allocates over tucker and cp candidates on one curve and, because
    the cp prediction is optimistic, also over tucker alone; all are fitted the same way.
    """
    stats = {}
    scales = {s.fqn: bn_output_scale(gm, s.nodes[0]) if len(s.nodes) == 1 else None for s in sites}
    if ref is not None and batches:
        node_to_site = {n.name: s.fqn for s in sites for n in s.nodes if skip_reason(s.geometry) is None}
        with eval_mode(ref):
            stats = channel_stats(ref, node_to_site, batches)
    curves: dict[str, list[Candidate]] = {}
    fixed = conv_before
    plans: dict[str, FactorPlan | str] = {}
    for site in sites:
        reason = skip_reason(site.geometry)
        if reason is not None:
            plans[site.fqn] = reason
            continue
        if not bool(torch.isfinite(site.weight).all()):
            raise ConvfxError("weights contain NaN or inf; cannot factorize", where=site.fqn)
        if site.geometry.linear:
            plans[site.fqn] = "Linear layers are not part of the conv-MAC budget; give them a rank instead"
            continue
        in_shape = tuple(site.nodes[0].meta["convfx_in_shape"])
        n_calls = len(site.nodes)
        st = stats.get(site.fqn)
        cands = layer_candidates(site, layer_method(site.geometry, method), in_shape,
                                 st.c_in if st else None, st.c_out if st else None, multiple, scales[site.fqn])
        curves[site.fqn] = [Candidate(c.plan, c.macs * n_calls, c.err2) for c in cands]
        fixed -= cands[0].macs * n_calls
    budget = int(math.floor(target * conv_before))
    curves_by = {"": curves}
    if method == "auto":  # the tucker-only curves are the mixed ones without their cp plans
        curves_by = {"+".join(AUTO_METHODS) + " ": curves,
                     "tucker ": {fqn: [c for c in cs if c.plan is None or c.plan.method != "cp"]
                                 for fqn, cs in curves.items()}}
    noise: dict[str, float] | None = None
    out: list[tuple[str, dict[str, FactorPlan | str]]] = []
    for fam, fam_curves in curves_by.items():
        models: dict[str, dict[str, float]] = {"spectra": {}}
        if stats and ref is not None:
            models = _sensitivities(gm, ref, sites, fam_curves, stats, scales, batches, progress, noise)
            noise = models["noise"]
        for label, sens in models.items():
            weighted = {fqn: [Candidate(c.plan, c.macs, c.err2 * sens.get(fqn, 1.0)) for c in cands]
                        for fqn, cands in fam_curves.items()}
            chosen = allocate(weighted, budget, fixed)
            result = dict(plans)
            for fqn, cand in chosen.items():
                result[fqn] = cand.plan if cand.plan is not None else "flops_target allocation kept it at full cost"
            if all(result != other for _, other in out):
                out.append((fam + label, result))
    return out


def _sensitivities(gm: fx.GraphModule, ref: fx.GraphModule, sites: list[Site], curves: dict[str, list[Candidate]],
                   stats: dict[str, Any], scales: dict[str, torch.Tensor | None], batches: list[tuple[Any, ...]],
                   progress: bool, noise: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Per-layer sensitivity under each model, measured on the first calibration images.

    ``noise`` passes in a noise sensitivity already measured (it does not depend on the curves).
    """
    from tqdm.auto import tqdm

    def bar(what: str) -> Callable[[Any], Any]:
        return lambda items: tqdm(items, desc=what, disable=not progress or None, leave=False)

    by_fqn = {s.fqn: s for s in sites}
    sample = _first_images(batches, _SENSITIVITY_IMAGES)
    node_to_site = {n.name: s.fqn for s in sites for n in s.nodes if s.fqn in curves}
    probes = {fqn: [(c.err2, predicted_kernel(by_fqn[fqn].weight, c.plan, stats[fqn].c_in, stats[fqn].c_out,
                                              scales[fqn]))
                    for c in probe_points(cands) if c.plan is not None]
              for fqn, cands in curves.items() if fqn in stats}
    with eval_mode(gm), eval_mode(ref):
        if noise is None:
            noise = noise_sensitivity(ref, node_to_site, sample, scales, wrap=bar("sensitivity (noise)"))
        return {"noise": noise,
                "probe": probe_sensitivity(gm, probes, sample, node_to_site, wrap=bar("sensitivity (probes)"))}


def _best_allocation(gm: fx.GraphModule, ref: fx.GraphModule, sites: list[Site],
                     allocations: list[tuple[str, dict[str, FactorPlan | str]]], batches: list[tuple[Any, ...]],
                     progress: bool, shrink: float) -> tuple[dict[str, FactorPlan | str], dict[str, float], dict[str, float],
                                          dict[str, list[torch.Tensor]], str]:
    """Fit every allocation on a copy of ``gm``; keep the one closest to ``ref`` on the calibration data.

    Returns its plans, weight and output errors, fitted factor weights and a report note.
    """
    with eval_mode(ref), torch.no_grad():
        targets = [ref(*b) for b in batches]
    trials = []
    for label, plans in allocations:
        trial = copy.deepcopy(gm)
        sites_t = _same_sites(trial, sites)
        _mark_plans(sites_t, plans)
        errors: dict[str, float] = {}
        out_errors: dict[str, float] = {}
        fitted: dict[str, list[torch.Tensor]] = {}
        to_do = {fqn: p for fqn, p in plans.items() if isinstance(p, FactorPlan)}
        _fit_sequentially(trial, ref, sites_t, to_do, batches, errors, out_errors, fitted, progress, shrink)
        trials.append((_discrepancy(trial, batches, targets), label, plans, errors, out_errors, fitted))
        del trial
    _, label, plans, errors, out_errors, fitted = min(trials, key=lambda t: t[0])
    note = ("flops_target: allocations fitted under " + ", ".join(
        f"{t[1]} sensitivities (calibration output discrepancy {t[0]:.4g})" for t in trials) + f"; kept {label}")
    log.info(note)
    return plans, errors, out_errors, fitted, note


def _discrepancy(gm: fx.GraphModule, batches: list[tuple[Any, ...]], targets: list[Any]) -> float:
    """Mean output discrepancy of ``gm`` from the original's outputs (inf if not comparable)."""
    total = 0.0
    with eval_mode(gm), torch.no_grad():
        for batch, y0 in zip(batches, targets):
            y = gm(*batch)
            if not (isinstance(y0, torch.Tensor) and isinstance(y, torch.Tensor)):
                return math.inf
            total += output_discrepancy(y, y0)
    return total / max(len(batches), 1)


def _mark_plans(sites: list[Site], plans: dict[str, FactorPlan | str]) -> None:
    """Record each site's plan (or skip reason) in its nodes' meta, as the analysis passes do."""
    for site in sites:
        for node in site.nodes:
            node.meta["convfx_plan"] = plans[site.fqn]


def _same_sites(gm: fx.GraphModule, like: list[Site]) -> list[Site]:
    """The sites of a copy of the graph that ``like`` came from, in the same order."""
    by_fqn = {s.fqn: s for s in find_sites(gm)[0]}
    return [by_fqn[s.fqn] for s in like]


def _first_images(batches: list[tuple[Any, ...]], n: int) -> tuple[Any, ...]:
    """The first ``n`` calibration inputs as one batch (fewer if there are fewer)."""
    xs: list[torch.Tensor] = []
    for (x,) in batches:
        xs.append(x[:n])
        n -= int(xs[-1].shape[0])
        if n <= 0:
            break
    return (torch.cat(xs),)


def _fit_sequentially(gm: fx.GraphModule, ref: fx.GraphModule, sites: list[Site], plans: dict[str, FactorPlan],
                      batches: list[tuple[Any, ...]], errors: dict[str, float], out_errors: dict[str, float],
                      fitted: dict[str, list[torch.Tensor]], progress: bool, shrink: float) -> list[Any]:
    """Fit and rewrite one layer at a time, each on the inputs of the compressed prefix.

    Fills ``errors``/``out_errors`` (weight and output errors) and ``fitted`` (factor
    weights) per layer.
    """
    from tqdm.auto import tqdm

    done = []
    todo = [s for s in sites if s.fqn in plans]
    ref_names = {n.name for n in ref.graph.nodes}
    with eval_mode(gm), eval_mode(ref), torch.no_grad():
        f_ref = [Frontier(ref, b) for b in batches]
        f_cur = [Frontier(gm, b) for b in batches]
        for site in tqdm(todo, desc="calibrating", disable=not progress or None, leave=False):
            plan = plans[site.fqn]
            name = site.nodes[0].name
            if name not in ref_names:
                raise ConvfxError("cannot match this layer between the original and compressed graphs",
                                  where=site.fqn)
            if len(site.nodes) > 1:  # shared layer: fit from its weights only
                ws, errors[site.fqn] = decompose_weights(site.weight, site.bias, site.geometry, plan)
                fitted[site.fqn] = ws
                done += factorize_sites(gm, [site], {site.fqn: plan}, lambda _s, _p, ws=ws: ws)
                continue
            st = collect_moments(f_ref, f_cur, name, site.geometry)
            cp_init = None
            if plan.method == "cp":
                cp_init, _ = decompose_weights(site.weight, site.bias, site.geometry, plan)
            ws, w_hat, out_err = fit_factors(site.weight, site.geometry, plan.method, plan.ranks, st, cp_init,
                                             out_scale=bn_output_scale(gm, site.nodes[0]), shrink=shrink)
            errors[site.fqn] = relative_error(site.weight, w_hat)
            out_errors[site.fqn] = out_err
            fitted[site.fqn] = ws
            done += factorize_sites(gm, [site], {site.fqn: plan}, lambda _s, _p, ws=ws: ws)
    return done


#: Relative residual at which each chain's sensitivity is probed for method="id". On
#: EfficientNet-Lite0 at 1.3x: top-1 79.0 probing at 0.05, 79.4 at 0.15 (the widths it
#: chooses leave residuals of about that size).
_ID_PROBE = 0.15


def _hidden_pairs(f_ref: list[Frontier], f_cur: list[Frontier] | None, node: str,
                  skip: tuple[str, Tensor] | None = None) -> Iterator[tuple[Any, ...]]:
    """(original, current[, shift]) inputs of ``node`` per calibration batch; the same tensor twice
    without ``f_cur``. ``skip`` (node name, scale) adds the shift (original − current skip value) / scale
    that lets ``node`` cancel its prefix's error on a residual join (:func:`passes.interp.skip_join`)."""
    for i, f in enumerate(f_ref):
        h_o = f.run_until(node)
        if f_cur is None:
            yield h_o, h_o
            continue
        h_c = f_cur[i].run_until(node)
        yield (h_o, h_c) if skip is None else (h_o, h_c, _skip_shift(f, f_cur[i], *skip))


def _skip_shift(f_ref: Frontier, f_cur: Frontier, name: str, scale: Tensor) -> Tensor | None:
    """(original − current) value of node ``name`` held by two paused frontiers, divided by ``scale``."""
    x_o, x_c = f_ref.value(name), f_cur.value(name)
    if x_o is None or x_c is None or x_o.dim() < 2 or x_o.shape[1] != scale.numel():
        return None  # not computed yet at this pause (the other branch runs later), or not a skip
    return (x_o.double() - x_c.double()).div_(scale.to(x_o.device).view(1, -1, *([1] * (x_o.dim() - 2)))).to(x_o.dtype)


def _id_row(gm: fx.GraphModule, site: Site, widths: tuple[int, ...], out_err: float | None) -> LayerReport:
    """Report row of a narrowed conv, costed from its current weight (a conv can be in two chains)."""
    row = _site_row(site, None, None, None, "data")
    mod = gm.get_submodule(site.fqn)
    kept = mod.weight.numel() / site.weight.numel()  # MACs and params scale with it (same output size)
    row.method, row.ranks, row.skipped = "id", widths, None
    row.macs_after = int(round(row.macs_before * kept))
    row.params_after = mod.weight.numel() + (mod.bias.numel() if getattr(mod, "bias", None) is not None else 0)
    row.output_error = out_err
    return row


#: A chain that joins a residual add (``x + BN(last(h))``) is fitted to the original *block*
#: output, so it also cancels its prefix's error on ``x`` (:func:`passes.interp.skip_join`).
#: EfficientNet-Lite0 at 1.3x, 300 calibration / 1000 report images, refit only: output KL
#: to the original 0.296 -> 0.162, top-1 78.8 -> 79.4; with ``refine_steps=300``: KL 0.118, 80.4.
#: A switch for ablations only.
SKIP_TARGETS = True


def _compress_id(gm: fx.GraphModule, ref: fx.GraphModule, sites: list[Site], batches: list[tuple[Any, ...]],
                 target: float, conv_before: int, progress: bool, refine_steps: int = 0
                 ) -> tuple[list[LayerReport], str]:
    """method="id": allocate hidden widths to the FLOP budget, then prune and refit chain by chain.

    Each chain's residual-vs-width curve comes from the original model's activations; its
    sensitivity from one probe (the chain alone at residual ``_ID_PROBE``, output
    discrepancy on the first calibration images). The fit then runs in order on the
    already-pruned prefix, so each chain also absorbs what its predecessors changed (where a
    residual add follows, also their error on the skip: ``SKIP_TARGETS``). With
    ``refine_steps``, each narrowed chain is then trained (all its weights, a local label-free
    loss, :func:`passes.interp.refine_chain`) to reproduce the original chain's output; this
    holds one chain's input and output activations over the calibration set at a time.
    """
    from tqdm.auto import tqdm

    chosen = {s.fqn for s in sites}
    chains = [c for c in find_chains(gm, sites) if all(s.fqn in chosen for s in c.convs)]
    if not chains:
        raise ConvfxError("method='id' found no conv -> channel-wise ops -> 1x1 conv chain to narrow",
                          where=type(gm).__name__, hint="use tucker/svd/cp for this model")
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    chains.sort(key=lambda c: order[c.last.nodes[0].name])
    bar = {"disable": not progress or None, "leave": False}
    curves, moments = {}, {}
    with eval_mode(ref), torch.no_grad():
        f_ref = [Frontier(ref, b) for b in batches]
        for c in tqdm(chains, desc="id: curves", **bar):
            moments[c.name] = chain_moments(c, _hidden_pairs(f_ref, None, c.last.nodes[0].name))
            curves[c.name] = greedy_order(moments[c.name])
        sample = _first_images(batches, _SENSITIVITY_IMAGES)
        y0 = ref(*sample)
    sens = {}
    with torch.no_grad():
        for c in tqdm(chains, desc="id: sensitivity", **bar):
            keep_order, resid = curves[c.name]
            k = int((resid > _ID_PROBE).sum()) + 1
            k = min(k, c.hidden)
            trial = copy.deepcopy(gm)
            twin = next(t for t in find_chains(trial) if t.name == c.name)
            prune_chain(trial, twin, keep_order[:k], *refit(moments[c.name], keep_order[:k]))
            trial.recompile()
            with eval_mode(trial):
                disc = output_discrepancy(trial(*sample), y0)
            sens[c.name] = disc / max(float(resid[k - 1]), 1e-12)
            del trial
    saving = conv_before - int(math.floor(target * conv_before))
    try:
        widths = allocate_widths({n: r for n, (_, r) in curves.items()}, sens, chain_macs(chains), saving)
    except ValueError as exc:
        raise ConvfxError(f"flops_target={target} is out of reach for method='id': {exc}", where="flops_target",
                          hint="raise flops_target or use another method") from None
    out_errs: dict[str, float] = {}
    with eval_mode(gm), eval_mode(ref), torch.no_grad():
        f_ref = [Frontier(ref, b) for b in batches]
        f_cur = [Frontier(gm, b) for b in batches]
        for c in tqdm(chains, desc="id: fitting", **bar):
            k = widths[c.name]
            if k >= c.hidden:
                continue
            last = c.last.nodes[0]
            x_in = [f.run_until(c.first.nodes[0].name) for f in f_cur] if refine_steps else []
            join = skip_join(gm, c) if SKIP_TARGETS else None
            skip = (join[0].name, join[1]) if join is not None else None
            pairs = _hidden_pairs(f_ref, f_cur, last.name, skip)
            if refine_steps:  # the frontiers hold these anyway; the refine targets reuse the shifts
                pairs = list(pairs)
            mo = chain_moments(c, pairs)
            keep = greedy_order(mo)[0][:k]
            w, b = refit(mo, keep)
            prune_chain(gm, c, keep, w, b)
            if not refine_steps:
                idx = sorted(keep)
                for f in f_cur:  # paused at the narrowed conv: its hidden input loses the dropped channels
                    f.rewritten(last, lambda h: h[:, idx])
                out_errs[c.last.fqn] = math.sqrt(refit_residual(mo, keep, w, b))
                continue
            w0 = c.last.weight.detach()  # the original's (the site was found before any rewrite)
            b0 = c.last.bias.detach() if c.last.bias is not None else None
            targets = torch.cat([F.conv2d(h_o, w0, b0) + (d[0] if d and d[0] is not None else 0)
                                 for h_o, _, *d in pairs])
            del pairs
            err = refine_chain(chain_graph(gm, c), torch.cat(x_in), targets, refine_steps)
            del targets
            hidden = chain_graph(gm, c, end=last.args[0])
            for f, x in zip(f_cur, x_in):  # the chain's weights all moved: recompute the paused input
                f.rewritten(last, lambda _h, x=x: hidden(x))
            out_errs[c.last.fqn] = math.sqrt(err)
    gm.graph.lint()
    gm.recompile()
    in_chain = {s.fqn for c in chains for s in c.convs}
    narrowed: dict[str, list[int]] = {}  # conv -> hidden widths of its narrowed chains, upstream first
    for c in chains:
        if widths[c.name] < c.hidden:
            for s in c.convs:
                narrowed.setdefault(s.fqn, []).append(widths[c.name])
    rows: list[LayerReport] = []
    for s in sites:
        if s.fqn in narrowed:
            rows.append(_id_row(gm, s, tuple(narrowed[s.fqn]), out_errs.get(s.fqn)))
            continue
        reason = ("flops_target allocation kept its chain at full width" if s.fqn in in_chain else
                  "method='id' narrows conv -> channel-wise ops -> 1x1 conv chains; this conv is in none")
        rows.append(_site_row(s, None, reason, None))
    note = (f"method='id': {len(narrowed)} convs in {sum(widths[c.name] < c.hidden for c in chains)} "
            f"chain(s) narrowed; widths allocated by probe sensitivity (residual {_ID_PROBE})")
    if refine_steps:
        note += f"; each narrowed chain refined by {refine_steps} local gradient steps on the calibration data"
    elif any(widths[c.name] < c.hidden for c in chains):
        note += "; least-squares refit only (refine_steps=0)"
    return rows, note


def compress(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
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
    progress: bool = True,
) -> fx.GraphModule:
    """Replace the convolutions of ``model`` by low-rank factorizations.

    Returns a ``torch.fx.GraphModule`` whose factors live under the original layer names
    (``layer1.0.conv2.0``, ``.1``, ``.2``) and whose ``convfx_report`` lists every conv.

    Args:
        model: any module that ``torch.fx`` can trace (untraceable submodules are kept as
            leaves and their convs reported as skipped).
        example_inputs: a tensor or tuple of tensors; without it an image of shape
            (1, C_in, 224, 224) is assumed from the first conv and the report says so.
        method: ``"tucker"`` (Tucker-2), ``"cp"`` or ``"svd"``. 1x1 convs always use SVD.
            A Tucker factor at full channel rank is folded into the core (one layer less).
            ``"auto"`` (with ``flops_target``) lets the allocation pick tucker or cp per layer
            (:data:`passes.allocate.AUTO_METHODS`); with calibration the tucker-only allocation
            is fitted too and kept when it reproduces the original better.
            ``"id"`` (with ``flops_target`` and ``calibration``) instead narrows the hidden
            channels between a conv and a 1x1 conv joined only by channel-wise ops (BN,
            activations, depthwise convs: inverted-residual blocks) and refits the 1x1 conv by
            least squares (:mod:`passes.interp`); other convs are reported as kept.
        rank: ``"vbmf"``, ``"energy:0.9"``, an int, a ``(r_out, r_in)`` tuple, a float in
            (0, 1] or a dict ``{fqn: any of those}``. See :mod:`passes.ranks`.
        filter_fn: ``filter_fn(module, fqn) -> bool`` selecting layers; default: every
            ``nn.Conv2d``. Return True for an ``nn.Linear`` to factorize it by SVD.
        inplace: reuse (and modify) ``model``'s modules instead of working on a copy.
        calibration: a DataLoader or any iterable of batches (tensors, or tuples whose
            first item is the input). Factors are then fitted to reproduce each layer's
            outputs on these activations, layer by layer on the already-compressed prefix.
            A few hundred to a few thousand images suffice; memory is O(D²) per layer.
        flops_target: a fraction f in (0, 1]: ranks are allocated across layers so that the
            conv MACs (fvcore count) are at most f × the original's. Replaces ``rank``. With
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
            not fine-tuning (:func:`passes.interp.refine_chain`). On EfficientNet-Lite0 300 steps
            about halve the output KL to the original. 0 (default) keeps the refit alone.
        progress: show a progress bar while fitting layers.

    Example:
        >>> import torchvision
        >>> gm = compress(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224), rank=0.5)
        >>> gm.convfx_report.conv_reduction > 1
        True
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    _validate(method, rank, filter_fn, flops_target)
    if flops_target is not None:
        if isinstance(flops_target, bool) or not isinstance(flops_target, (int, float)) \
                or not 0.0 < float(flops_target) <= 1.0:
            raise ValueError(f"flops_target: expected a fraction in (0, 1], got {flops_target!r}")
        if rank != "vbmf":
            raise ValueError("rank: pass either rank or flops_target, not both (flops_target allocates ranks)")
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple: expected a positive int, got {rank_multiple!r}")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps: expected an int >= 0, got {refine_steps!r}")
    if refine_steps and method != "id":
        raise ValueError(f"refine_steps: only method='id' refines by gradient steps (method={method!r})")
    if isinstance(calibration_shrink, bool) or not isinstance(calibration_shrink, (int, float)) \
            or not math.isfinite(calibration_shrink) or calibration_shrink < 0:
        raise ValueError(f"calibration_shrink: expected a finite number >= 0, got {calibration_shrink!r}")
    t0 = time.perf_counter()
    inputs, assumptions = _resolve_inputs(model, example_inputs)
    batches = _calibration_batches(calibration, model, calibration_batches)
    src = model if inplace else copy.deepcopy(model)
    select = filter_fn or default_filter

    traced = trace(src)
    gm = traced.gm
    propagate_shapes(gm, inputs)
    annotate_macs(gm)
    conv_before, total_before = fvcore_macs(gm, inputs)
    params_before = _count_params(gm)

    sites, skipped = find_sites(gm)
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - {s.fqn for s in sites})
        if unknown:
            raise ValueError(f"rank: dict names layer(s) that are not factorizable convs in this model: "
                             f"{unknown[:5]}")
    chosen: list[Site] = []
    rows: list[LayerReport] = []
    for site in sites:
        owner = _owner(src, gm, site.fqn)
        if not select(owner, site.fqn):
            if site.kind != "linear":
                rows.append(_site_row(site, None, "excluded by filter_fn", None))
            continue
        if site.kind == "linear" and type(owner) is not nn.Linear:
            continue
        chosen.append(site)

    ref = trace(model).gm if batches else None
    id_note: str | None = None
    if method == "id":
        if ref is None:
            raise ValueError("calibration: method='id' refits each chain's last conv on data; pass calibration=...")
        if rank_multiple > 1:
            raise ValueError("rank_multiple: not supported with method='id' (widths are allocated per channel)")
        id_rows, id_note = _compress_id(gm, ref, chosen, batches, float(flops_target), conv_before, progress,
                                        refine_steps)
        rows += id_rows
        chosen, allocations = [], [("", {})]
    elif flops_target is not None:
        allocations = _allocate(gm, chosen, method, float(flops_target), conv_before, ref, batches, rank_multiple,
                                progress)
    else:
        plans = select_ranks(chosen, method, rank)
        if rank_multiple > 1:
            plans = _round_plans(chosen, plans, rank, rank_multiple)
        allocations = [("", plans)]
    plans = allocations[0][1]
    errors: dict[str, float] = {}
    out_errors: dict[str, float] = {}
    fitted: dict[str, list[torch.Tensor]] = {}
    alloc_note: str | None = None
    if batches and ref is not None and len(allocations) > 1:
        plans, errors, out_errors, fitted, alloc_note = _best_allocation(gm, ref, chosen, allocations, batches,
                                                                         progress, calibration_shrink)
    _mark_plans(chosen, plans)
    to_do = {fqn: p for fqn, p in plans.items() if isinstance(p, FactorPlan)}
    if alloc_note is not None:  # the kept allocation's fitted factors go into this graph
        done = factorize_sites(gm, chosen, to_do, lambda site, _plan: fitted[site.fqn])
    elif batches and ref is not None:
        done = _fit_sequentially(gm, ref, chosen, to_do, batches, errors, out_errors, {}, progress,
                                 calibration_shrink)
    else:
        def weights(site: Site, plan: FactorPlan) -> list[torch.Tensor]:
            ws, err = decompose_weights(site.weight, site.bias, site.geometry, plan)
            errors[site.fqn] = err
            return ws

        done = factorize_sites(gm, chosen, to_do, weights)
    for site in chosen:
        p = plans[site.fqn]
        plan = p if isinstance(p, FactorPlan) else None
        row = _site_row(site, plan, None if plan else str(p), errors.get(site.fqn),
                        "data" if site.fqn in out_errors else "weights")
        row.output_error = out_errors.get(site.fqn)
        rows.append(row)
    for s in skipped:
        rows.append(LayerReport(s.fqn, s.kind, (), None, None, None, None, 0, 0, 0, 0, None, skipped=s.reason))
    rows.extend(LayerReport(s.fqn, "conv", tuple(_owner(src, gm, s.fqn).weight.shape), None, None, None, None,
                            0, 0, 0, 0, None, skipped=s.reason)
                for s in _conv_modules_outside_graph(src, {s.fqn for s in sites} | {s.fqn for s in skipped},
                                                          traced))
    order = {name: i for i, (name, _) in enumerate(src.named_modules())}
    rows.sort(key=lambda r: order.get(r.fqn, len(order)))

    if inplace:
        for fs in done:
            if isinstance(_owner(model, gm, fs.fqn), nn.Conv2d | nn.Linear) and fs.container.n_factors:
                try:
                    set_submodule(model, fs.fqn, fs.container)
                except AttributeError:
                    pass

    conv_after, total_after = fvcore_macs(gm, inputs)
    report = Report(
        layers=rows, conv_macs_before=conv_before, conv_macs_after=conv_after,
        total_macs_before=total_before, total_macs_after=total_after,
        params_before=params_before, params_after=_count_params(gm),
        input_shapes=[tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        method=method,
        rank=(f"flops_target={flops_target}" if flops_target is not None
              else str(rank if not isinstance(rank, Mapping) else f"dict[{len(rank)}]")),
        assumptions=assumptions, seconds=time.perf_counter() - t0,
    )
    if batches:
        n_img = sum(int(b[0].shape[0]) for b in batches if isinstance(b[0], torch.Tensor))
        report.notes.append(f"factors fitted on {len(batches)} calibration batch(es), {n_img} input(s)")
        if alloc_note is not None:
            report.notes.append(alloc_note)
        if id_note is not None:
            report.notes.append(id_note)
    if method == "auto" and not batches:
        report.notes.append("method=auto without calibration: each layer's structure was chosen from predicted "
                            "errors alone, and the cp prediction is a lower bound; calibration checks it")
    if traced.leaf_fallbacks:
        report.notes.extend(f"{k!r} kept as an untraced leaf: {v}" for k, v in traced.leaf_fallbacks.items())
    gm.convfx_report = report  # type: ignore[assignment]
    log.info("compressed %s: conv MACs %s -> %s (%.2fx), %d layers factorized in %.2fs",
             type(model).__name__, f"{conv_before:,}", f"{conv_after:,}", report.conv_reduction,
             len(report.factorized), report.seconds)
    return gm


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


def analyze(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> Analysis:
    """Count MACs (fvcore) and parameters of a plain module or a compressed GraphModule.

    >>> a = analyze(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 10, 10))
    >>> a.conv_macs == 8 * 3 * 3 * 3 * 8 * 8
    True
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    inputs, assumptions = _resolve_inputs(model, example_inputs)
    gm = trace(model).gm
    propagate_shapes(gm, inputs)
    annotate_macs(gm)
    conv, total = fvcore_macs(model, inputs)
    layers: list[LayerStats] = []
    for node in gm.graph.nodes:
        if "convfx_macs" not in node.meta:
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            fqn, op, wshape = str(node.target), type(mod).__name__, tuple(mod.weight.shape)
        else:
            w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            fqn = str(w.target).rsplit(".", 1)[0]
            op, wshape = "conv2d", tuple(gm.get_parameter(str(w.target)).shape)
        layers.append(LayerStats(fqn, op, tuple(node.meta["convfx_in_shape"]),
                                 tuple(node.meta["convfx_out_shape"]), wshape, int(node.meta["convfx_macs"])))
    return Analysis(conv_macs=conv, total_macs=total, params=_count_params(model), layers=layers,
                    input_shapes=[tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
                    assumptions=assumptions)

