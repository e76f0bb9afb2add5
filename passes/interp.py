"""Interpolative decomposition (ID) of the hidden channels between two convs.

In an inverted-residual block (``1x1 expand → BN → act → depthwise → BN → act → 1x1
project``) every op between the two full convs acts on each hidden channel alone. So a
subset S of hidden channels can be kept exactly through the chain, and the project conv
refitted to reproduce its output from S alone:

    W h  ≈  W' h_S + b'      (least squares on calibration activations)

which is the data-aware interpolative decomposition ``h ≈ P h_S`` of the hidden activations,
seen through ``W``. It cuts the expand conv's rows, the depthwise channels and the project
conv's columns together, which a per-conv SVD cannot: on 1x1-heavy nets such as
EfficientNet-Lite0 the SVD of a 1x1 conv only saves MACs below ~0.86x its channel count.

S is chosen greedily (pivoted-Cholesky forward selection): each step adds the channel
that most reduces the residual of the target given the channels already kept. The order
is nested, so one pass gives the whole error-vs-width curve of a chain. Only second
moments of the hidden activations are streamed: O(n²) memory per chain.

Where the block ends in a residual add (``x + BN(W h)``), the caller can shift the target by
``(x_original − x_current) / BN slope`` (:func:`skip_join`): the refit then reproduces the
original *block* output, cancelling what the narrowed blocks before it changed on ``x``.

Analysis (:func:`find_chains`, :func:`skip_join`, :func:`chain_moments`, :func:`greedy_order`) never mutates;
:func:`prune_chain` is the rewrite.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .calibrate import bn_output_scale
from .convs import Site, find_sites, set_submodule
from .meta import MACS, OUT_SHAPE

__all__ = ["Chain", "ChainMoments", "find_chains", "chain_moments", "greedy_order", "refit", "refit_residual",
           "prune_chain", "chain_macs", "allocate_widths", "chain_graph", "refine_chain", "skip_join", "RIDGE",
           "REFINE_LR", "REFINE_BATCH"]

#: Adam learning rate (cosine-decayed to 0) and images per step of :func:`refine_chain`:
#: a lower rate left more of the output KL in the same number of steps (the sweep is in
#: ``benchmarks/results/accuracy_runs/lite_id_sweep_cuda_h200.md``).
REFINE_LR = 1e-3
REFINE_BATCH = 32

#: Ridge added to the hidden covariance, relative to its mean diagonal: enough to keep the
#: selection stable on a few hundred images, little enough not to bias the refit towards 0.
RIDGE = 1e-3

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.GELU, nn.Sigmoid,
                nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.ZeroPad2d)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.silu, F.hardswish, F.hardsigmoid, F.gelu, torch.sigmoid,
                  F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.mish, F.dropout}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_"}


@dataclass
class Chain:
    """``first`` (a full conv) → channel-wise nodes → ``last`` (a full 1x1 conv) over ``hidden`` channels."""

    first: Site
    last: Site
    depthwise: list[Site]
    norms: list[str]  # BatchNorm2d module names inside the chain
    hidden: int

    @property
    def name(self) -> str:
        return self.last.fqn

    @property
    def convs(self) -> list[Site]:
        return [self.first, *self.depthwise, self.last]


def _channelwise(gm: fx.GraphModule, node: fx.Node, prev: fx.Node, calls: dict[str, int]) -> str | None:
    """'' if ``node`` acts on each channel of ``prev`` alone, 'bn' for a BatchNorm2d, else None."""
    if not node.args or node.args[0] is not prev or any(isinstance(a, fx.Node) for a in node.args[1:]) \
            or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.BatchNorm2d):
            return "bn" if calls[str(node.target)] == 1 else None
        if isinstance(mod, _ACT_MODULES) and not any(True for _ in mod.parameters()):
            if isinstance(mod, nn.ZeroPad2d) and len(mod.padding) > 4:
                return None
            return ""
        return None
    if node.op == "call_function":
        if node.target in _ACT_FUNCTIONS:
            return ""
        if node.target is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            return "" if isinstance(pad, (tuple, list)) and len(pad) <= 4 and mode == "constant" else None
        if node.target in (operator.mul, operator.truediv, operator.add, operator.sub) \
                and all(isinstance(a, (int, float)) for a in node.args[1:]):
            return ""
        return None
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return ""
    return None


def find_chains(gm: fx.GraphModule, sites: list[Site] | None = None) -> list[Chain]:
    """Every conv → channel-wise ops (BN, activations, padding, depthwise convs) → 1x1 conv chain. Read-only.

    Each node inside a chain must have a single user, so the hidden channels are seen by
    nothing else; each conv and BN in it is called once.
    """
    sites = find_sites(gm, include_linear=False)[0] if sites is None else sites
    by_node = {s.nodes[0]: s for s in sites if len(s.nodes) == 1 and s.geometry.is_conv2d}  # 4-d kernels only
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    chains = []
    for node, first in by_node.items():
        g = first.geometry
        if g.groups != 1:
            continue
        hidden, cur, dws, norms = g.out_channels, node, [], []
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            site = by_node.get(user)
            if site is not None:
                first_arg = user.args[0] if user.args else user.kwargs.get("input")
                if first_arg is not cur:
                    break
                sg = site.geometry
                if sg.is_depthwise and sg.in_channels == sg.out_channels == hidden:
                    dws.append(site)
                    cur = user
                    continue
                if sg.groups == 1 and sg.kernel_size == (1, 1) and sg.in_channels == hidden:
                    chains.append(Chain(first, site, dws, norms, hidden))
                break
            kind = _channelwise(gm, user, cur, calls)
            if kind is None:
                break
            if kind == "bn":
                norms.append(str(user.target))
            cur = user
    return chains


def chain_macs(chains: list[Chain]) -> list[tuple[int, tuple[str, ...]]]:
    """Each conv of ``chains`` as (its MACs, fvcore convention; the chains it is in).

    A conv can be in two chains (one's ``last``, the next one's ``first``); its MACs then
    scale with both widths.
    """
    seen: dict[str, tuple[int, list[str]]] = {}
    for c in chains:
        for s in c.convs:
            macs, names = seen.setdefault(s.fqn, (int(s.nodes[0].meta[MACS]), []))
            names.append(c.name)
    return [(macs, tuple(names)) for macs, names in seen.values()]


@dataclass
class ChainMoments:
    """Streamed moments for refitting ``last``: ``G = Σ [h_c;1][h_c;1]ᵀ`` and ``M = Σ t [h_c;1]ᵀ``.

    ``h_c`` are the hidden activations in the model compressed so far; the target ``t`` is
    the original model's ``last`` output (its input ``h_o`` through the original weights).
    """

    g: Tensor
    m: Tensor
    target_energy: float


_ADDS = {operator.add, torch.add, operator.iadd}


def skip_join(gm: fx.GraphModule, chain: Chain) -> tuple[fx.Node, Tensor] | None:
    """The residual ``add`` that ``chain``'s output joins, as (the skip operand, per-channel scale).

    Why: where a block ends in ``x + BN(last(h))``, the prefix's error on ``x`` passes the
    block untouched unless ``last`` cancels it. Its refit can: the target for ``last``'s
    output becomes ``t + (x_original − x_current) / a``, with ``a`` the eval BatchNorm's
    per-channel scale (1 without one). None where no such add follows (nothing to cancel).
    """
    node = chain.last.nodes[0]
    scale = bn_output_scale(gm, node, signed=True)
    if scale is not None:
        node = next(iter(node.users))
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    is_add = ((user.op == "call_function" and user.target in _ADDS)
              or (user.op == "call_method" and user.target == "add"))
    if not is_add or len(user.args) != 2 or user.kwargs or not all(isinstance(a, fx.Node) for a in user.args):
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    shapes = [n.meta.get(OUT_SHAPE) for n in (node, other)]
    if other is node or (None not in shapes and shapes[0] != shapes[1]):
        return None  # x + x, or a broadcast add (a bias-like tensor, not a skip)
    if scale is None:
        scale = torch.ones(chain.last.geometry.out_channels, dtype=torch.float64)
    return other, scale


def _rows(h: Tensor) -> Tensor:
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).double()


def chain_moments(chain: Chain, pairs: Iterable[tuple[Tensor, ...]]) -> ChainMoments:
    """Moments from (original, current[, shift]) hidden activations of ``chain.last``'s input.

    The target is the original ``last`` output on the original hidden activations, plus
    ``shift`` (same shape as that output) where given: see :func:`skip_join`.

    The error is measured at ``last``'s output, before any BatchNorm. Weighting the output
    channels by that BN's ``|γ|/σ`` lowered the output KL a little but cost top-1, so it is
    not done.
    """
    w = chain.last.weight.detach().reshape(chain.last.geometry.out_channels, -1).double()
    b = chain.last.bias.detach().double() if chain.last.bias is not None else None
    n = chain.hidden
    g = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=w.device)
    m = torch.zeros(w.shape[0], n + 1, dtype=torch.float64, device=w.device)
    energy = 0.0
    for h_o, h_c, *shift in pairs:
        hc = _rows(h_c)
        hc = torch.cat([hc, hc.new_ones(hc.shape[0], 1)], 1)
        t = _rows(h_o) @ w.T
        if b is not None:
            t = t + b
        if shift and shift[0] is not None:
            if shift[0].shape[0] * shift[0].shape[2:].numel() != t.shape[0] or shift[0].shape[1] != t.shape[1]:
                raise ValueError(f"chain {chain.name!r}: shift of shape {tuple(shift[0].shape)} does not match "
                                 f"its output ({t.shape[1]} channels, {t.shape[0]} positions)")
            t = t + _rows(shift[0])
        g += hc.T @ hc
        m += t.T @ hc
        energy += float(t.pow(2).sum())
    return ChainMoments(g, m, energy)


def _ridged(g: Tensor, ridge: float) -> Tensor:
    g = g.clone()
    g.diagonal()[:-1].add_(ridge * float(g.diagonal()[:-1].mean().clamp_min(1e-30)))
    return g


def greedy_order(mo: ChainMoments, ridge: float = RIDGE) -> tuple[list[int], Tensor]:
    """Hidden channels in greedy order, and the relative residual after keeping the first k (k = 1..n).

    Forward selection on ``tr(M_S G_SS⁻¹ M_Sᵀ)``: after each pick, ``G`` and ``M`` are
    replaced by their Schur complements, so a channel's gain is its residual correlation
    with the target divided by its residual variance. The constant (bias) is kept first.
    """
    g = _ridged(mo.g, ridge)
    m = mo.m.clone()
    n1 = g.shape[0]
    free = torch.ones(n1, dtype=torch.bool, device=g.device)
    order, gains = [], []
    j = n1 - 1
    for step in range(n1):
        if step:
            score = m.pow(2).sum(0) / g.diagonal().clamp_min(1e-30)
            score[~free] = -1.0
            j = int(score.argmax())
        col = g[:, j].clone()
        d = float(col[j])
        gain = float(m[:, j].pow(2).sum()) / d if d > 0 else 0.0
        if d > 0:
            m -= torch.outer(m[:, j], col) / d
            g -= torch.outer(col, col) / d
        free[j] = False
        if step:
            order.append(j)
            gains.append(gain)
        else:
            base = gain
    total = max(mo.target_energy, 1e-30)
    explained = base + torch.tensor(gains, dtype=torch.float64).cumsum(0)
    return order, (1.0 - explained / total).clamp_min(0.0)


def refit(mo: ChainMoments, keep: list[int], ridge: float = RIDGE) -> tuple[Tensor, Tensor]:
    """Least-squares ``last`` weight (C_out, |keep|) and bias on the kept channels."""
    idx = torch.tensor([*keep, mo.g.shape[0] - 1], device=mo.g.device)
    g = _ridged(mo.g, ridge)[idx][:, idx]
    sol = torch.linalg.solve(g, mo.m[:, idx].T).T
    return sol[:, :-1], sol[:, -1]


def refit_residual(mo: ChainMoments, keep: list[int], weight: Tensor, bias: Tensor) -> float:
    """Relative residual ``‖t − W' h_S − b'‖² / ‖t‖²`` of a refit on the data of ``mo`` (no ridge)."""
    wa = torch.zeros_like(mo.m)
    wa[:, keep], wa[:, -1] = weight, bias
    resid = mo.target_energy - 2 * float((mo.m * wa).sum()) + float(((wa @ mo.g) * wa).sum())
    return max(resid, 0.0) / max(mo.target_energy, 1e-30)


def _set_arg(node: fx.Node, pos: int, name: str, value: object) -> None:
    """Set a conv2d call's argument, positional if it was given so, else as a keyword."""
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _set_conv(gm: fx.GraphModule, site: Site, weight: Tensor, bias: Tensor | None, groups: int | None) -> None:
    """Give a conv site new weights (and groups), under the same module name."""
    mod = gm.get_submodule(site.fqn)
    mod.weight = nn.Parameter(weight.to(site.weight.dtype).contiguous(), requires_grad=site.weight.requires_grad)
    node = site.nodes[0]
    if bias is not None:
        had_bias = getattr(mod, "bias", None) is not None
        mod.bias = nn.Parameter(bias.to(site.weight.dtype).contiguous())
        if site.kind == "function" and not had_bias:
            with gm.graph.inserting_before(node):
                b = gm.graph.get_attr(f"{site.fqn}.bias")
            _set_arg(node, 2, "bias", b)
    if isinstance(mod, nn.Conv2d):
        mod.out_channels, mod.in_channels = int(weight.shape[0]), int(weight.shape[1]) * (groups or 1)
        if groups is not None:
            mod.groups = groups
    if site.kind == "function" and groups is not None:
        _set_arg(node, 6, "groups", groups)


def prune_chain(gm: fx.GraphModule, chain: Chain, keep: list[int], weight: Tensor, bias: Tensor) -> None:
    """Keep only the hidden channels ``keep`` of ``chain``; ``last`` gets ``weight``/``bias``.

    Modules keep their names (so state-dict keys map one-to-one); the caller lints and
    recompiles once after all chains. Chains may share a conv (one's ``last`` is the next
    one's ``first`` when no skip joins them): the current weights are sliced, so prune
    them upstream first (in the order of their last convs).
    """
    idx = torch.tensor(sorted(keep), device=chain.first.weight.device)
    pos = {c: i for i, c in enumerate(keep)}
    cols = torch.tensor([pos[int(c)] for c in idx.tolist()], device=weight.device)
    for site, groups in [(chain.first, None), *((dw, len(idx)) for dw in chain.depthwise)]:
        mod = gm.get_submodule(site.fqn)  # live weights: ``first`` may already be another chain's narrowed ``last``
        b = mod.bias.detach()[idx] if getattr(mod, "bias", None) is not None else None
        _set_conv(gm, site, mod.weight.detach()[idx], b, groups)
    for name in chain.norms:
        bn = gm.get_submodule(name)
        new = nn.BatchNorm2d(len(idx), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                             track_running_stats=bn.track_running_stats, device=idx.device,
                             dtype=chain.first.weight.dtype)
        with torch.no_grad():
            for attr in ("weight", "bias", "running_mean", "running_var"):
                src = getattr(bn, attr)
                if src is not None:
                    getattr(new, attr).copy_(src.detach()[idx])
            if bn.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        new.train(bn.training)
        set_submodule(gm, name, new)
    last = chain.last
    w = weight[:, cols].reshape(last.geometry.out_channels, len(idx), 1, 1)
    _set_conv(gm, last, w, bias, None)


def allocate_widths(curves: dict[str, Tensor], sens: dict[str, float], convs: list[tuple[int, tuple[str, ...]]],
                    saving: int) -> dict[str, int]:
    """Hidden widths that save at least ``saving`` MACs at the least ``Σ sens · residual``.

    ``convs`` is :func:`chain_macs`: a conv's MACs scale with the product of width/hidden
    over the chains it is in. Lagrangian: each chain takes ``argmin_k sens·r(k) + λ·k·m``
    (``m``: its MACs per hidden channel); λ is bisected until the exact saving is reached.
    Widths never go below 1.
    """
    hidden = {n: r.shape[0] for n, r in curves.items()}
    per_channel = {n: 0.0 for n in curves}
    for macs, names in convs:
        for n in names:
            per_channel[n] += macs / hidden[n]

    def widths(lam: float) -> dict[str, int]:
        out = {}
        for name, r in curves.items():
            k = torch.arange(1, r.shape[0] + 1, dtype=torch.float64)
            out[name] = int((sens[name] * r + lam * k * per_channel[name]).argmin()) + 1
        return out

    def saved(ws: dict[str, int]) -> int:
        return sum(macs - round(macs * math.prod(ws[n] / hidden[n] for n in names)) for macs, names in convs)

    most = saved({n: 1 for n in curves})
    if saving > most:
        raise ValueError(f"cannot save {saving:,} MACs by removing hidden channels: at most {most:,}")
    lo, hi = 0.0, 1.0
    while saved(widths(hi)) < saving:
        hi *= 4.0
        if not math.isfinite(hi):
            break
    for _ in range(100):
        mid = (lo + hi) / 2
        if saved(widths(mid)) >= saving:
            hi = mid
        else:
            lo = mid
    ws = widths(hi)
    while True:  # spend the slack that λ's jumps leave: widen where it lowers the loss most per MAC
        best, best_rate = None, 0.0
        for n, r in curves.items():
            k = ws[n]
            if k >= hidden[n] or saved({**ws, n: k + 1}) < saving:
                continue
            rate = sens[n] * float(r[k - 1] - r[k]) / per_channel[n]
            if best is None or rate > best_rate:
                best, best_rate = n, rate
        if best is None:
            return ws
        ws[best] += 1


def chain_graph(gm: fx.GraphModule, chain: Chain, end: fx.Node | None = None) -> fx.GraphModule:
    """The chain alone, from ``first``'s input to ``end`` (default: ``last``'s output). Read-only.

    Its parameters are ``gm``'s own objects, so training them trains ``gm``.
    """
    first, end = chain.first.nodes[0], end or chain.last.nodes[0]
    path = [first]
    while path[-1] is not end:
        path.append(next(iter(path[-1].users)))
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {first.args[0] if first.args else first.kwargs["input"]: g.placeholder("x")}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:  # a weight read (functional convs)
            env[n] = g.node_copy(n)
        return env[n]

    for n in path:
        env[n] = g.node_copy(n, arg)
    g.output(env[end])
    return fx.GraphModule(gm, g)


def refine_chain(sub: fx.GraphModule, inputs: Tensor, targets: Tensor, steps: int, lr: float = REFINE_LR,
                 batch: int = REFINE_BATCH, seed: int = 0) -> float:
    """Train every parameter of a narrowed chain to reproduce the original chain's output.

    Why: the least-squares refit moves only ``last``; letting the kept rows of ``first``,
    the depthwise filters and the BN affines move too absorbs more of the dropped channels.
    The loss is local (this chain's output, relative to the target's energy) and label-free; BatchNorm statistics stay frozen (eval mode). Adam,
    cosine-decayed. Returns the relative error on all of ``inputs``; if training raised it
    (too few steps to get past Adam's first moves), the starting weights are put back.
    """
    params = [p for p in sub.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    total = max(float(targets.pow(2).sum()), 1e-30)
    energy = total / targets.numel()
    gen = torch.Generator().manual_seed(seed)
    was_training = sub.training
    sub.eval()

    def error() -> float:
        with torch.no_grad():
            return sum(float((sub(inputs[i:i + batch]) - targets[i:i + batch]).pow(2).sum())
                       for i in range(0, inputs.shape[0], batch)) / total

    start, saved = error(), [p.detach().clone() for p in params]
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
            for _ in range(steps):
                idx = torch.randint(0, inputs.shape[0], (min(batch, inputs.shape[0]),), generator=gen)
                idx = idx.to(inputs.device)
                loss = (sub(inputs[idx]) - targets[idx]).pow(2).mean() / energy
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
        sub.train(was_training)
    end = error()
    if end <= start:
        return end
    with torch.no_grad():  # too few steps to get past Adam's first moves: keep the starting point
        for p, v in zip(params, saved):
            p.copy_(v)
    return start
