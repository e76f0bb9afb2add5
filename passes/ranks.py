"""Rank specifications and the rank-selection pass.

A rank spec is one of:

* ``"vbmf"`` — EVBMF on the mode-0 and mode-1 unfoldings (never 0);
* ``"energy:F"`` — smallest rank keeping the fraction F of singular-value energy;
* ``int`` — that rank (for tucker, on both channel modes);
* ``(r_out, r_in)`` — tucker ranks (SVD layers use ``min(r_out, r_in)``);
* ``float`` f in (0, 1] — tucker: ``ceil(f·C)`` per channel mode; svd: ``ceil(f·full rank)``;
  cp: the R whose factor parameters are about ``f`` × the original layer's parameters,
  ``R = ceil(f · C_out·C_in·∏k / (C_in + Σk + C_out))`` (k: the kernel's sides, 1-3 of them);
* a ``dict`` mapping a layer's qualified name to any of the above (other layers are
  left alone and reported as such).

Explicit ranks are honoured even when they save nothing; automatic ones (``vbmf``,
``energy``) leave a layer alone when the factorization would not cut its MACs.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Union

import torch

from .convs import ConvGeometry, Site, oi_kernel
from .decompose import energy_rank, unfold
from .errors import ConvfxError
from .factors import METHODS, FactorPlan, factor_cost, max_ranks, original_cost
from .meta import IN_SHAPE

__all__ = [
    "COMPRESS_METHODS", "RankSpec", "validate_rank_spec", "layer_method", "skip_reason", "choose_plan", "is_automatic",
    "select_ranks",
]

RankSpec = Union[str, int, float, tuple, Mapping[str, Any]]

#: What ``compress(method=)`` accepts: a factor structure, or "auto" (chosen per layer by ``flops_target``).
COMPRESS_METHODS = (*METHODS, "auto", "id")


def _check_scalar(value: Any, where: str) -> None:
    if isinstance(value, bool):
        raise ValueError(f"rank: booleans are not ranks ({where}: {value!r})")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"rank: must be a positive integer, got {value} ({where})")
    elif isinstance(value, float):
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise ValueError(f"rank: a float rank is a fraction in (0, 1], got {value} ({where})")
    elif isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"rank: a tuple must be (r_out, r_in), got {value!r} ({where})")
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"rank: tuple entries must be positive ints, got {value!r} ({where})")
    elif isinstance(value, str):
        if value == "vbmf":
            return
        if value.startswith("energy:"):
            try:
                frac = float(value.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"rank: cannot parse energy fraction in {value!r} ({where})") from None
            if not (0.0 < frac <= 1.0):
                raise ValueError(f"rank: energy fraction must be in (0, 1], got {frac} ({where})")
            return
        raise ValueError(f"rank: unknown rank rule {value!r} ({where}); use 'vbmf', 'energy:0.9', an int, "
                         "a (r_out, r_in) tuple, a float in (0, 1] or a dict")
    else:
        raise ValueError(f"rank: unsupported type {type(value).__name__} ({where})")


def validate_rank_spec(rank: RankSpec) -> None:
    """Raise ``ValueError`` naming ``rank`` for malformed specs, before any work is done."""
    if isinstance(rank, Mapping):
        for k, v in rank.items():
            if not isinstance(k, str):
                raise ValueError(f"rank: dict keys must be qualified layer names, got {k!r}")
            if isinstance(v, Mapping):
                raise ValueError(f"rank: nested dicts are not allowed (key {k!r})")
            _check_scalar(v, f"layer {k!r}")
    else:
        if isinstance(rank, list):
            rank = tuple(rank)
        _check_scalar(rank, "global")


def is_automatic(value: Any) -> bool:
    return isinstance(value, str)


def layer_method(geom: ConvGeometry, method: str) -> str:
    """The structure a layer gets: pointwise convs and Linears always use SVD.

    ``"auto"`` (chosen per layer by the ``flops_target`` allocation) stays ``"auto"`` for
    k×k convs.
    """
    if method not in COMPRESS_METHODS:
        raise ValueError(f"method: expected one of {COMPRESS_METHODS}, got {method!r}")
    return "svd" if geom.is_pointwise else method


def skip_reason(geom: ConvGeometry) -> str | None:
    """Why a conv cannot be factorized at all, or None."""
    if geom.is_depthwise:
        return f"depthwise conv (groups={geom.groups}) has no channel redundancy to factor"
    if geom.groups > 1:
        return f"grouped conv (groups={geom.groups}) is not supported"
    return None


def _svd_matrix(site: Site) -> torch.Tensor:
    return _oi_weight(site).reshape(site.geometry.out_channels, -1)


def _oi_weight(site: Site) -> torch.Tensor:
    """The site's kernel in the (C_out, C_in, k...) layout whatever its conv type."""
    return oi_kernel(site.weight.detach(), site.geometry)


def _auto_rank(site: Site, method: str, rule: str) -> tuple[int, ...]:
    if rule == "vbmf":
        from .vbmf import evbmf_rank

        def estimate(m: torch.Tensor) -> int:
            return max(1, int(evbmf_rank(m)))
    else:
        frac = float(rule.split(":", 1)[1])

        def estimate(m: torch.Tensor) -> int:
            return energy_rank(m, frac)
    if method == "svd":
        return (estimate(_svd_matrix(site)),)
    r_out = estimate(unfold(_oi_weight(site), 0))
    r_in = estimate(unfold(_oi_weight(site), 1))
    return (r_out, r_in) if method == "tucker" else (max(r_out, r_in),)


def _explicit_rank(site: Site, method: str, value: Any) -> tuple[int, ...]:
    g = site.geometry
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, float):
        if method == "tucker":
            return (math.ceil(value * g.out_channels), math.ceil(value * g.in_channels))
        if method == "svd":
            return (max(1, math.ceil(value * max_ranks(g, "svd")[0])),)
        full = (g.out_channels * g.in_channels * math.prod(g.kernel_size)
                / (g.in_channels + sum(g.kernel_size) + g.out_channels))
        return (max(1, math.ceil(value * full)),)
    if isinstance(value, int):
        return (value, value) if method == "tucker" else (value,)
    # (r_out, r_in) tuple
    return tuple(value) if method == "tucker" else (min(value),)


def choose_plan(site: Site, method: str, value: Any) -> tuple[FactorPlan | None, str | None]:
    """The plan for one site, or ``(None, reason)`` when an automatic rank saves nothing.

    Raises ``ValueError`` (naming ``rank`` and the layer) for an explicit rank above the
    mode size, and :class:`ConvfxError` for non-finite weights.
    """
    if not bool(torch.isfinite(site.weight).all()) or (
            site.bias is not None and not bool(torch.isfinite(site.bias).all())):
        raise ConvfxError("weights contain NaN or inf; cannot factorize", where=site.fqn)
    m = layer_method(site.geometry, method)
    _check_scalar(value, f"layer {site.fqn!r}")
    ranks = _auto_rank(site, m, value) if is_automatic(value) else _explicit_rank(site, m, value)
    limits = max_ranks(site.geometry, m)
    if is_automatic(value):
        ranks = tuple(min(r, lim) for r, lim in zip(ranks, limits))
    else:
        names = ("output-channel", "input-channel") if m == "tucker" else ("maximum",)
        for r, lim, name in zip(ranks, limits, names):
            if r > lim:
                raise ValueError(f"rank: {r} exceeds the {name} rank {lim} of layer {site.fqn!r} "
                                 f"({m}); pass a per-layer dict, a float fraction, or exclude it "
                                 "with filter_fn")
    plan = FactorPlan(m, tuple(int(r) for r in ranks))
    if is_automatic(value):
        shape = _input_shape(site)
        before = original_cost(site.geometry, shape)[0]
        after = factor_cost(site.geometry, plan, shape)[0]
        if after >= before:
            return None, (f"{value} ranks {plan.ranks} would not reduce MACs "
                          f"({after:,} >= {before:,})")
    return plan, None


def _input_shape(site: Site) -> tuple[int, ...]:
    node = site.nodes[0]
    shape = node.meta.get(IN_SHAPE)
    if shape is None:
        raise ConvfxError("no shape information; run shape propagation first", where=site.fqn)
    return tuple(shape)



def select_ranks(sites: list[Site], method: str, rank: RankSpec) -> dict[str, FactorPlan | str]:
    """The rank-selection pass: a plan (or a skip reason) per site.

    It reads weights and shapes only; the graph is not changed.
    """
    out: dict[str, FactorPlan | str] = {}
    for site in sites:
        reason = skip_reason(site.geometry)
        plan: FactorPlan | None = None
        if reason is None:
            if isinstance(rank, Mapping):
                if site.fqn not in rank:
                    reason = "no rank given for this layer in the rank dict"
                else:
                    plan, reason = choose_plan(site, method, rank[site.fqn])
            else:
                plan, reason = choose_plan(site, method, tuple(rank) if isinstance(rank, list) else rank)
        out[site.fqn] = plan if plan is not None else str(reason)
    return out
