"""The latency objective: allocate ranks to a measured speed on the user's device.

``latency_target=f`` asks for a model that runs in ``f`` × the original's time on the
example inputs' device, batch, dtype and memory layout, with the backend the user names
(:data:`passes.latency.BACKENDS`). It is the same allocation as ``flops_target``'s over a
different cost (:class:`LatencyCost`, registered in :data:`passes.budget.COSTS`):

1. **price** — the original model is timed whole; each layer's original conv and a few
   candidates per factor structure, spread over its MAC range, are timed on their own
   (:class:`passes.latency.MeasuredLayerTimer`, cached on disk); the other candidates'
   times are interpolated in MACs between measured ones of the same structure. Candidates
   not faster than the original conv are dropped; a layer left with none is kept, with
   that reason.
2. **choose** — the convex-hull allocation meets the budget on those per-layer costs,
   whose sum is not the model's time (fusions, launches, layout changes). So the
   allocation's model is built (weights do not change time) and measured whole, side by
   side with the original, and the budget is corrected by the gap between measured and
   predicted time, until the measured speedup is within :data:`TOLERANCE` of the target
   or the plan stops changing. The returned choice is never slower than the original:
   it is the least compressed plan that meets the target, else the fastest one found.

What is measured is reported (:class:`LatencyOutcome`): the whole-model times with their
spread, the per-layer times, and whether the target was reached.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.fx as fx
from torch import nn

from .allocate import Candidate, _hull, allocate
from .context import Context
from .convs import ConvGeometry, Site, find_sites
from .factors import FactorPlan
from .latency import (LayerSpec, MeasuredLayerTimer, ProfileCache, ProfileKey, Timing, device_name, prepare,
                      time_interleaved)
from .meta import IN_SHAPE
from .rewrite import factorize_sites

__all__ = ["LatencyMeter", "MeasuredMeter", "LatencyCost", "LatencyOutcome", "TOLERANCE", "MAX_ROUNDS",
           "POINTS_PER_STRUCTURE", "build_structure", "layout_of", "next_budget"]

log = logging.getLogger("convfx")

#: Relative distance of the measured time from the target time that counts as reached.
TOLERANCE = 0.03
#: Whole-model measurements of the correction loop, at most (each may compile the model).
MAX_ROUNDS = 4
#: Candidates timed per factor structure of a layer; the others are interpolated in MACs.
POINTS_PER_STRUCTURE = 5
#: Fractions of a layer's MACs near which those candidates are taken (on the error hull).
_POINT_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)

Curves = dict[str, list[Candidate]]


class LatencyMeter(Protocol):
    """What the latency objective measures; tests inject deterministic ones."""

    def layers(self, specs: Sequence[LayerSpec]) -> dict[LayerSpec, float]:
        """Seconds per call of each layer on its own."""
        ...

    def compare(self, candidate: nn.Module | None) -> tuple[Timing, Timing | None]:
        """The original's timing and, side by side with it, ``candidate``'s (None: the original alone).

        A meter may answer from an earlier measurement of the same models on the same device.
        """
        ...

    @property
    def device(self) -> str:
        """The device and settings measured on, as the report names them."""
        ...


MeterFactory = Callable[[nn.Module, tuple[Any, ...], str], LatencyMeter]


def layout_of(inputs: tuple[Any, ...]) -> tuple[torch.device, torch.dtype, bool]:
    """Device, floating dtype and channels_last-ness of the first tensor input."""
    for x in inputs:
        if isinstance(x, torch.Tensor):
            cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            return x.device, x.dtype if x.is_floating_point() else torch.float32, cl
    return torch.device("cpu"), torch.float32, False


class MeasuredMeter:
    """Real timings: layers by :class:`MeasuredLayerTimer` (profile cache), models interleaved.

    The original model is prepared (compiled, for inductor) once and timed beside every
    candidate; whole-model results are cached too, keyed by the graph's code and tensor
    shapes, so that a second compress of the same model measures nothing new.
    """

    def __init__(self, original: nn.Module, inputs: tuple[Any, ...], backend: str, *,
                 cache: ProfileCache | None = None, warmup: int = 3, rounds: int = 15) -> None:
        self.inputs = inputs
        self.backend = backend
        dev, dtype, channels_last = layout_of(inputs)
        self.cache = cache if cache is not None else ProfileCache()
        self.timer = MeasuredLayerTimer(backend, dev, dtype, channels_last, self.cache)
        self._device = dev
        self.warmup, self.rounds = warmup, rounds
        self.original = original
        self._original_fn: Callable[[], Any] | None = None
        self.models_measured = 0
        self.models_cached = 0

    @property
    def device(self) -> str:
        return f"{device_name(self._device)} | backend={self.backend}"

    def layers(self, specs: Sequence[LayerSpec]) -> dict[LayerSpec, float]:
        return self.timer(specs)

    def _key(self, model: nn.Module, what: str) -> ProfileKey:
        """Cache key of a whole model: its code, its tensors' shapes and dtypes, the inputs' shapes."""
        h = hashlib.sha256()
        h.update(getattr(model, "code", type(model).__qualname__).encode())
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(repr([tuple(x.shape) for x in self.inputs if isinstance(x, torch.Tensor)]).encode())
        context = self.timer.key(LayerSpec(ConvGeometry(1, 1), (1, 1, 1, 1))).context  # device, backend, ...
        return ProfileKey(context, f"model {what} {h.hexdigest()[:24]}")

    def compare(self, candidate: nn.Module | None) -> tuple[Timing, Timing | None]:
        okey = self._key(self.original, "original")
        key = okey if candidate is None else self._key(candidate, f"vs {okey.layer[-24:]}")
        parts = ("orig", "orig_spread") + (() if candidate is None else ("cand", "cand_spread"))
        keys = [ProfileKey(key.context, f"{key.layer} {part}") for part in parts]
        cached = [self.cache.get(k) for k in keys]
        if all(v is not None for v in cached):
            self.models_cached += 1
            v = [float(x) for x in cached]  # type: ignore[arg-type]
            return Timing(v[0], v[1], 0), (Timing(v[2], v[3], 0) if candidate is not None else None)
        if self._original_fn is None:
            self._original_fn = prepare(self.original, self.inputs, self.backend)
        fns = {"original": self._original_fn}
        if candidate is not None:
            fns["candidate"] = prepare(candidate, self.inputs, self.backend)
        t = time_interleaved(fns, warmup=self.warmup, rounds=self.rounds, device=self._device)
        self.models_measured += 1
        o, c = t["original"], t.get("candidate")
        values = [o.median, o.spread] + ([] if c is None else [c.median, c.spread])
        self.cache.put_many(dict(zip(keys, values)))
        return o, c


@dataclass
class LatencyOutcome:
    """What the latency objective measured, for the report."""

    target: float
    backend: str
    device: str
    original_ms: float = math.nan
    original_spread_ms: float = math.nan
    compressed_ms: float = math.nan
    compressed_spread_ms: float = math.nan
    predicted_speedup: float = math.nan
    reached: bool = False
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured) speedup per round
    layer_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # fqn -> (before, after)
    note: str = ""

    @property
    def measured_speedup(self) -> float:
        return self.original_ms / self.compressed_ms if self.compressed_ms > 0 else math.nan


def build_structure(gm: fx.GraphModule, sites: list[Site], plans: Mapping[str, Any]) -> fx.GraphModule:
    """A copy of ``gm`` with each planned site replaced by its factor chain (untrained weights).

    Time does not depend on weight values, so this is what the allocation's model will cost.
    """
    trial = copy.deepcopy(gm)
    by_fqn = {s.fqn: s for s in find_sites(trial)[0]}
    todo = {fqn: p for fqn, p in plans.items() if isinstance(p, FactorPlan)}
    with torch.no_grad():
        factorize_sites(trial, [by_fqn[s.fqn] for s in sites if s.fqn in todo], todo, weight_fn=None)
    return trial.eval()


def _specs(site: Site, plan: FactorPlan | None) -> list[LayerSpec]:
    return [LayerSpec(site.geometry, tuple(n.meta[IN_SHAPE]), plan) for n in site.nodes]


def _to_measure(cands: list[Candidate]) -> list[Candidate]:
    """A few candidates per structure on its error hull, spread over the layer's MAC range."""
    full = cands[0].macs
    picked: list[Candidate] = []
    for method in sorted({c.plan.method for c in cands if c.plan is not None}):
        hull = [c for c in _hull([cands[0]] + [c for c in cands if c.plan is not None and c.plan.method == method])
                if c.plan is not None]
        for f in _POINT_FRACTIONS[:POINTS_PER_STRUCTURE]:
            c = min(hull, key=lambda c: abs(c.macs / max(full, 1) - f), default=None)
            if c is not None and c not in picked:
                picked.append(c)
    return picked


def _interpolate(macs: float, points: list[tuple[int, float]]) -> float:
    """Piecewise-linear time at ``macs`` through measured (MACs, seconds).

    Beyond the measured range the nearest segment's slope continues (never below zero
    slope, never below zero time), so that a candidate outside it does not look cheap.
    """
    if len(points) == 1:
        return points[0][1]
    segments = list(zip(points, points[1:]))
    (m0, t0), (m1, t1) = next(((a, b) for a, b in segments if macs <= b[0]), segments[-1])
    slope = max((t1 - t0) / max(m1 - m0, 1), 0.0)
    return max(t0 + slope * (macs - m0), 0.0)


def next_budget(points: list[tuple[float, float]], goal: float) -> float:
    """The budget whose measured time should be ``goal``: a secant step on (budget, measured).

    The first step assumes the gap between predicted and measured time stays as it is;
    later ones follow the measured slope, kept inside the bracket the points so far give
    (bisection where the secant leaves it).
    """
    b, m = points[-1]
    step = goal - m
    if len(points) >= 2:
        b0, m0 = points[-2]
        if m != m0 and (b - b0) / (m - m0) > 0:
            step *= (b - b0) / (m - m0)
    nxt = b + step
    lo = max((p for p, t in points if t <= goal), default=None)
    hi = min((p for p, t in points if t > goal), default=None)
    if lo is not None and hi is not None and not lo < nxt < hi:
        nxt = (lo + hi) / 2
    return nxt


def measurements(meter: LatencyMeter, n: int) -> str:
    """How many whole-model comparisons were made, and how many an earlier run's cache answered."""
    cached = getattr(meter, "models_cached", 0)
    return f"{n} whole-model measurement(s)" + (f", {cached} answered by the profile cache" if cached else "")


class LatencyCost:
    """Measured seconds; budget ``latency_target`` × the original model's measured time."""

    what = "latency_target"
    unit = "seconds (measured)"

    def meter(self, ctx: Context) -> LatencyMeter:
        if ctx.meter is None:
            o = ctx.options
            factory: MeterFactory = o.latency_meter or (lambda m, x, b: MeasuredMeter(m, x, b))
            ctx.meter = factory(ctx.model, ctx.inputs, o.latency_backend)
        return ctx.meter

    def price(self, ctx: Context, curves: Curves) -> Any:
        from .budget import Priced  # the budget module registers this cost

        meter = self.meter(ctx)
        original, _ = meter.compare(None)
        by_fqn = {s.fqn: s for s in ctx.chosen}
        specs: list[LayerSpec] = []
        picks: dict[str, list[Candidate]] = {}
        for fqn, cands in curves.items():
            picks[fqn] = _to_measure(cands)
            specs += _specs(by_fqn[fqn], None)
            for c in picks[fqn]:
                specs += _specs(by_fqn[fqn], c.plan)
        times = meter.layers(specs)

        def seconds(fqn: str, plan: FactorPlan | None) -> float:
            return sum(times[s] for s in _specs(by_fqn[fqn], plan))

        priced: Curves = {}
        reasons: dict[str, str] = {}
        layer_ms: dict[str, tuple[float, float]] = {}
        for fqn, cands in curves.items():
            keep = seconds(fqn, None)
            by_method: dict[str, list[tuple[int, float]]] = {}
            for c in picks[fqn]:
                assert c.plan is not None
                by_method.setdefault(c.plan.method, []).append((c.macs, seconds(fqn, c.plan)))
            out = [Candidate(None, cands[0].macs, 0.0, keep)]
            for c in cands[1:]:
                assert c.plan is not None
                pts = sorted(by_method[c.plan.method])
                t = _interpolate(c.macs, pts)
                if t < keep:
                    out.append(Candidate(c.plan, c.macs, c.err2, t))
            if len(out) == 1:
                fastest = min(t for pts in by_method.values() for _, t in pts) if by_method else math.nan
                reasons[fqn] = (f"every factorization measured slower than the original conv "
                                f"({fastest * 1e3:.3g} ms or more vs {keep * 1e3:.3g} ms)")
            priced[fqn] = out
            layer_ms[fqn] = (keep * 1e3, keep * 1e3)
        total = original.median
        fixed = total - sum(cs[0].price for cs in priced.values())
        target = float(ctx.options.latency_target)  # type: ignore[arg-type]
        ctx.latency = LatencyOutcome(target, ctx.options.latency_backend, meter.device,
                                     original_ms=total * 1e3, original_spread_ms=original.spread * 1e3,
                                     layer_ms=layer_ms)
        return Priced(priced, target * total, fixed, reasons)

    def choose(self, ctx: Context, curves: Curves, budget: float, fixed: float, skip: Mapping[str, Any]
               ) -> tuple[dict[str, Candidate], dict[str, Any]]:
        """Allocate, measure the whole model, correct the budget; the best measured choice.

        Returns it with ``{"latency": LatencyOutcome}`` for the report.
        """
        meter = self.meter(ctx)
        assert ctx.latency is not None
        out = copy.deepcopy(ctx.latency)
        target = out.target
        goal = budget  # seconds, in the units of the first original measurement
        floor = fixed + sum(min(c.price for c in cs) for cs in curves.values())
        tried: dict[tuple[Any, ...], tuple[float, float, dict[str, Candidate], Timing, Timing]] = {}
        points: list[tuple[float, float]] = []  # (budget, measured seconds)
        for _ in range(MAX_ROUNDS):
            budget = max(budget, floor)
            chosen = allocate(curves, budget, fixed, what=self.what, unit=self.unit)
            key = tuple(sorted((k, c.plan) for k, c in chosen.items() if c.plan is not None))
            if key in tried:
                break
            predicted = fixed + sum(c.price for c in chosen.values())
            plans = {**skip, **{k: c.plan for k, c in chosen.items() if c.plan is not None}}
            o, c = meter.compare(build_structure(ctx.gm, ctx.chosen, plans))
            assert c is not None
            ratio = c.median / o.median
            tried[key] = (ratio, predicted, chosen, o, c)
            out.rounds.append((out.original_ms / 1e3 / predicted, 1 / ratio))
            log.info("latency_target=%g: predicted %.3gx, measured %.3gx", target, out.rounds[-1][0],
                     out.rounds[-1][1])
            if abs(ratio / target - 1) <= TOLERANCE:
                break
            points.append((budget, ratio * out.original_ms / 1e3))
            budget = next_budget(points, goal)
            if budget < floor and points[-1][0] <= floor:
                break  # already at the cheapest plans: nothing left to cut
        meets = [t for t in tried.values() if t[0] <= target * (1 + TOLERANCE)]
        ratio, predicted, chosen, o, c = (max(meets, key=lambda t: t[0]) if meets
                                          else min(tried.values(), key=lambda t: t[0]))
        if ratio >= 1:
            out.note = (f"latency_target={target}: no factorization made the model faster on {out.device} "
                        f"(best measured {1 / ratio:.3f}x); every layer kept")
            out.compressed_ms, out.compressed_spread_ms = out.original_ms, out.original_spread_ms
            out.predicted_speedup = 1.0
            return {k: cs[0] for k, cs in curves.items()}, {"latency": out}
        out.reached = bool(meets)
        out.original_ms, out.original_spread_ms = o.median * 1e3, o.spread * 1e3
        out.compressed_ms, out.compressed_spread_ms = c.median * 1e3, c.spread * 1e3
        out.predicted_speedup = out.original_ms / 1e3 / predicted if predicted > 0 else math.nan
        for fqn, cand in chosen.items():
            out.layer_ms[fqn] = (out.layer_ms[fqn][0], cand.price * 1e3)
        got = f"measured {out.measured_speedup:.3f}x (spread {out.compressed_spread_ms:.3g} ms on " \
              f"{out.compressed_ms:.3g} ms) vs the target {1 / target:.3f}x"
        out.note = (f"latency_target={target} on {out.device}: " + got +
                    ("" if meets else "; the target was not reached: this is the fastest model found") +
                    f"; {measurements(meter, len(tried))}")
        return chosen, {"latency": out}
