"""The ``method="id"`` rank source: narrow hidden channels of conv → channel-wise → 1x1 chains.

Plan (:func:`plan_widths`): each chain's residual-vs-width curve comes from the original
model's activations (:func:`passes.interp.greedy_order`), its sensitivity from one probe
(the chain alone truncated to residual :data:`PROBE_RESIDUAL`, output discrepancy on the
first calibration images), and the widths from a Lagrangian allocation to the FLOP budget
(:func:`passes.interp.allocate_widths`).

Fit (:func:`fit_widths`): chain by chain, upstream first, on the already-narrowed prefix,
so each chain also absorbs what its predecessors changed; where a residual add follows, it
is fitted to the original *block* output and so also cancels their error on the skip
(``skip_targets``). With ``refine_steps`` each narrowed chain is then trained (all its
weights, a local label-free loss, :func:`passes.interp.refine_chain`) to reproduce the
original chain's output; this holds one chain's input and output activations over the
calibration set at a time.

:func:`narrow_chains` is the one code path that applies widths to a graph: the fit calls
it with a data fitter, :func:`convfx.load` with placeholders that the saved state dict
then overwrites.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .batches import first_images
from .budget import SENSITIVITY_IMAGES
from .calibrate import Frontier, output_discrepancy
from .context import Allocation, Context
from .errors import ConvfxError
from .flops import eval_mode
from .interp import (Chain, allocate_widths, chain_graph, chain_macs, chain_moments, find_chains, greedy_order,
                     prune_chain, refine_chain, refit, refit_residual, skip_join)
from .outcome import narrowed_row, site_row

__all__ = ["PROBE_RESIDUAL", "ChainFitter", "narrow_chains", "plan_widths", "fit_widths", "upstream_first"]

#: Relative residual at which each chain's sensitivity is probed: about the residual the
#: chosen widths leave, so the probe measures harm where the allocation will operate.
PROBE_RESIDUAL = 0.15


def upstream_first(gm: fx.GraphModule, chains: list[Chain]) -> list[Chain]:
    """``chains`` in the order of their last convs, so a conv two chains share is sliced upstream first."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(chains, key=lambda c: order[c.last.nodes[0].name])


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


class ChainFitter(Protocol):
    """Chooses the kept channels and the refit of one chain, and follows up once it is pruned."""

    def solve(self, chain: Chain, width: int) -> tuple[list[int], Tensor, Tensor]:
        ...

    def pruned(self, chain: Chain) -> None:
        ...


def narrow_chains(gm: fx.GraphModule, chains: list[Chain], widths: dict[str, int],
                  fitter: ChainFitter | None = None,
                  wrap: Callable[[list[Chain]], Iterable[Chain]] = lambda cs: cs) -> list[Chain]:
    """Narrow each chain to ``widths[chain.name]`` hidden channels, upstream first; lint and recompile.

    Without a ``fitter`` the first channels are kept and the refit is zero: the shapes are
    right, and a state dict brings the weights. ``wrap`` wraps the chains to narrow (a
    progress bar). Returns the chains it narrowed.
    """
    todo = [c for c in upstream_first(gm, chains) if widths.get(c.name, c.hidden) < c.hidden]
    for c in wrap(todo):
        k = widths[c.name]
        if fitter is None:
            out = c.last.geometry.out_channels
            keep, w, b = list(range(k)), torch.zeros(out, k), torch.zeros(out)
        else:
            keep, w, b = fitter.solve(c, k)
        prune_chain(gm, c, keep, w, b)
        if fitter is not None:
            fitter.pruned(c)
    gm.graph.lint()
    gm.recompile()
    return todo


# ------------------------------------------------------------------------------ plan
def _curves(ctx: Context) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Each chain's residual-vs-width curve and its measured sensitivity; sets ``ctx.chains``."""
    assert ctx.ref is not None
    gm, ref, batches = ctx.gm, ctx.ref, ctx.batches
    chosen = {s.fqn for s in ctx.chosen}
    chains = [c for c in find_chains(gm, ctx.chosen) if all(s.fqn in chosen for s in c.convs)]
    if not chains:
        raise ConvfxError("method='id' found no conv -> channel-wise ops -> 1x1 conv chain to narrow",
                          where=type(gm).__name__, hint="use tucker/svd/cp for this model")
    chains = upstream_first(gm, chains)
    ctx.chains = chains
    bar = {"disable": not ctx.options.progress or None, "leave": False}
    curves, moments = {}, {}
    with eval_mode(ref), torch.no_grad():
        f_ref = [Frontier(ref, b) for b in batches]
        for c in tqdm(chains, desc="id: curves", **bar):
            moments[c.name] = chain_moments(c, _hidden_pairs(f_ref, None, c.last.nodes[0].name))
            curves[c.name] = greedy_order(moments[c.name])
        sample = first_images(batches, SENSITIVITY_IMAGES)
        y0 = ref(*sample)
    sens = {}
    with torch.no_grad():
        for c in tqdm(chains, desc="id: sensitivity", **bar):
            keep_order, resid = curves[c.name]
            k = min(int((resid > PROBE_RESIDUAL).sum()) + 1, c.hidden)
            trial = copy.deepcopy(gm)
            twin = next(t for t in find_chains(trial) if t.name == c.name)
            prune_chain(trial, twin, keep_order[:k], *refit(moments[c.name], keep_order[:k]))
            trial.recompile()
            with eval_mode(trial):
                disc = output_discrepancy(trial(*sample), y0)
            sens[c.name] = disc / max(float(resid[k - 1]), 1e-12)
            del trial
    return {n: r for n, (_, r) in curves.items()}, sens


def _widths(ctx: Context, curves: dict[str, Tensor], sens: dict[str, float], fraction: float) -> dict[str, int]:
    saving = ctx.conv_before - int(math.floor(fraction * ctx.conv_before))
    return allocate_widths(curves, sens, chain_macs(ctx.chains), saving)


def plan_widths(ctx: Context) -> list[Allocation]:
    """Rank source ``"id"``: each chain's hidden width, allocated to ``flops_target``.

    Under ``latency_target`` the conv-MAC fraction is the knob: the narrowed model is
    measured whole and the fraction corrected until the measured time meets the target
    (:func:`_widths_to_latency`).
    """
    curves, sens = _curves(ctx)
    if ctx.options.latency_target is not None:
        return [_widths_to_latency(ctx, curves, sens)]
    target = float(ctx.options.flops_target)  # type: ignore[arg-type]
    try:
        widths = _widths(ctx, curves, sens, target)
    except ValueError as exc:
        raise ConvfxError(f"flops_target={target} is out of reach for method='id': {exc}", where="flops_target",
                          hint="raise flops_target or use another method") from None
    return [Allocation("", widths)]


def _widths_to_latency(ctx: Context, curves: dict[str, Tensor], sens: dict[str, float]) -> Allocation:
    """Widths whose narrowed model measures ``latency_target`` × the original's time (or the fastest found)."""
    from .speed import MAX_ROUNDS, TOLERANCE, LatencyCost, LatencyOutcome, measurements, next_budget

    o = ctx.options
    target = float(o.latency_target)  # type: ignore[arg-type]
    meter = LatencyCost().meter(ctx)
    original, _ = meter.compare(None)
    out = LatencyOutcome(target, o.latency_backend, meter.device, original_ms=original.median * 1e3,
                         original_spread_ms=original.spread * 1e3)
    floor = min(f for f in (0.05 * i for i in range(1, 21)) if _reachable(ctx, curves, sens, f))
    tried: list[tuple[float, float, dict[str, int], Any, Any]] = []
    points: list[tuple[float, float]] = []
    fraction = target
    for _ in range(MAX_ROUNDS):
        fraction = min(max(fraction, floor), 1.0)
        widths = _widths(ctx, curves, sens, fraction)
        if any(t[2] == widths for t in tried):
            break
        trial = copy.deepcopy(ctx.gm)
        narrow_chains(trial, find_chains(trial), widths)
        t_o, t_c = meter.compare(trial.eval())
        ratio = t_c.median / t_o.median
        tried.append((ratio, fraction, widths, t_o, t_c))
        out.rounds.append((1 / fraction, 1 / ratio))
        if abs(ratio / target - 1) <= TOLERANCE:
            break
        points.append((fraction, ratio))
        fraction = next_budget(points, target)
        if fraction < floor and points[-1][0] <= floor:
            break
    meets = [t for t in tried if t[0] <= target * (1 + TOLERANCE)]
    ratio, fraction, widths, t_o, t_c = max(meets, key=lambda t: t[0]) if meets else min(tried, key=lambda t: t[0])
    if ratio >= 1:
        widths = {c.name: c.hidden for c in ctx.chains}
        out.compressed_ms, out.compressed_spread_ms, out.predicted_speedup = out.original_ms, out.original_spread_ms, 1.0
        out.note = (f"latency_target={target}: no narrowing made the model faster on {out.device} "
                    f"(best measured {1 / ratio:.3f}x); every chain kept")
    else:
        out.reached = bool(meets)
        out.original_ms, out.original_spread_ms = t_o.median * 1e3, t_o.spread * 1e3
        out.compressed_ms, out.compressed_spread_ms = t_c.median * 1e3, t_c.spread * 1e3
        out.predicted_speedup = 1 / fraction  # the MAC reduction asked of the allocation
        out.note = (f"latency_target={target} on {out.device}: measured {out.measured_speedup:.3f}x vs the target "
                    f"{1 / target:.3f}x at {1 / fraction:.3f}x fewer conv MACs"
                    + ("" if meets else "; the target was not reached: this is the fastest model found")
                    + f"; {measurements(meter, len(tried))}")
    ctx.latency = out
    return Allocation("", widths, {"latency": out})


def _reachable(ctx: Context, curves: dict[str, Tensor], sens: dict[str, float], fraction: float) -> bool:
    try:
        _widths(ctx, curves, sens, fraction)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------- fit
class _DataFitter:
    """Refits each chain on the calibration data, on the already-narrowed prefix."""

    def __init__(self, ctx: Context) -> None:
        assert ctx.ref is not None
        self.gm = ctx.gm
        self.refine_steps = ctx.options.refine_steps
        self.skip_targets = ctx.options.skip_targets
        self.f_ref = [Frontier(ctx.ref, b) for b in ctx.batches]
        self.f_cur = [Frontier(ctx.gm, b) for b in ctx.batches]
        self.out_errors: dict[str, float] = {}
        self._pending: tuple[Any, ...] = ()

    def solve(self, chain: Chain, width: int) -> tuple[list[int], Tensor, Tensor]:
        last = chain.last.nodes[0]
        x_in = [f.run_until(chain.first.nodes[0].name) for f in self.f_cur] if self.refine_steps else []
        join = skip_join(self.gm, chain) if self.skip_targets else None
        skip = (join[0].name, join[1]) if join is not None else None
        pairs: Any = _hidden_pairs(self.f_ref, self.f_cur, last.name, skip)
        if self.refine_steps:  # the frontiers hold these anyway; the refine targets reuse the shifts
            pairs = list(pairs)
        mo = chain_moments(chain, pairs)
        keep = greedy_order(mo)[0][:width]
        w, b = refit(mo, keep)
        self._pending = (x_in, pairs, mo, keep, w, b)
        return keep, w, b

    def pruned(self, chain: Chain) -> None:
        x_in, pairs, mo, keep, w, b = self._pending
        self._pending = ()
        last = chain.last.nodes[0]
        if not self.refine_steps:
            idx = sorted(keep)
            for f in self.f_cur:  # paused at the narrowed conv: its hidden input loses the dropped channels
                f.rewritten(last, lambda h: h[:, idx])
            self.out_errors[chain.last.fqn] = math.sqrt(refit_residual(mo, keep, w, b))
            return
        w0 = chain.last.weight.detach()  # the original's (the site was found before any rewrite)
        b0 = chain.last.bias.detach() if chain.last.bias is not None else None
        targets = torch.cat([F.conv2d(h_o, w0, b0) + (d[0] if d and d[0] is not None else 0)
                             for h_o, _, *d in pairs])
        del pairs
        err = refine_chain(chain_graph(self.gm, chain), torch.cat(x_in), targets, self.refine_steps)
        del targets
        hidden = chain_graph(self.gm, chain, end=last.args[0])
        for f, x in zip(self.f_cur, x_in):  # the chain's weights all moved: recompute the paused input
            f.rewritten(last, lambda _h, x=x: hidden(x))
        self.out_errors[chain.last.fqn] = math.sqrt(err)


def fit_widths(ctx: Context, allocations: list[Allocation]) -> None:
    """Fit stage of ``method="id"``: narrow and refit chain by chain, then report each conv."""
    assert ctx.ref is not None
    gm, chains = ctx.gm, ctx.chains
    widths: dict[str, int] = allocations[0].plans
    bar = {"disable": not ctx.options.progress or None, "leave": False}
    with eval_mode(gm), eval_mode(ctx.ref), torch.no_grad():
        fitter = _DataFitter(ctx)
        narrow_chains(gm, chains, widths, fitter, wrap=lambda cs: tqdm(cs, desc="id: fitting", **bar))
    ctx.widths = {c.name: widths[c.name] for c in chains if widths[c.name] < c.hidden}
    in_chain = {s.fqn for c in chains for s in c.convs}
    narrowed: dict[str, list[int]] = {}  # conv -> hidden widths of its narrowed chains, upstream first
    for c in chains:
        if c.name in ctx.widths:
            for s in c.convs:
                narrowed.setdefault(s.fqn, []).append(widths[c.name])
    for s in ctx.chosen:
        if s.fqn in narrowed:
            ctx.rows.append(narrowed_row(s, gm.get_submodule(s.fqn), tuple(narrowed[s.fqn]),
                                         fitter.out_errors.get(s.fqn)))
            continue
        what = "latency_target" if ctx.options.latency_target is not None else "flops_target"
        reason = (f"{what} allocation kept its chain at full width" if s.fqn in in_chain else
                  "method='id' narrows conv -> channel-wise ops -> 1x1 conv chains; this conv is in none")
        ctx.rows.append(site_row(s, None, reason))
    refine = ctx.options.refine_steps
    note = (f"method='id': {len(narrowed)} convs in {len(ctx.widths)} "
            f"chain(s) narrowed; widths allocated by probe sensitivity (residual {PROBE_RESIDUAL})")
    if refine:
        note += f"; each narrowed chain refined by {refine} local gradient steps on the calibration data"
    elif ctx.widths:
        note += "; least-squares refit only (refine_steps=0)"
    ctx.notes.append(note)
