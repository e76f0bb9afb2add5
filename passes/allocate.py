"""FLOP-budgeted rank allocation across layers.

Every layer gets a curve of candidate plans — (MACs, predicted relative output error²) —
including "leave it as it is" (original MACs, zero error). The allocation keeps each
curve's lower convex hull and greedily takes the step with the smallest error increase
per MAC saved until the conv-MAC budget is met. MACs come from the same per-conv
formulas fvcore uses, so the budget holds when fvcore counts the result.

Predicted errors come from spectra, weighted by data when there is any:

* tucker (r_out, r_in): tail energy of the output covariance beyond r_out plus tail energy
  of the input-covariance-whitened mode-1 unfolding beyond r_in (relative);
* svd (r): tail energy of the whitened weight matrix beyond r;
* cp (R): the tucker error at ranks (min(R, C_out), min(R, C_in)) plus the tail beyond R of
  the kernel's (C_out·k_h)×(C_in·k_w) matricization (the worst over which spatial axis goes
  with C_out; for 1-d and 3-d kernels alike) — each of them is a lower bound, since every
  matricization of a rank-R CP has rank ≤ R; CP layers are still allocated optimistically
  (plus a tiny term decreasing in R, so that ranks beyond the channel counts still rank).

Without data the input covariance is the identity and the output covariance W Wᵀ.
Kernels of every conv type are read in the (C_out, C_in, k...) layout
(:func:`passes.convs.oi_kernel`), so transposed convs are allocated like plain ones.

``method="auto"`` puts the tucker and cp candidates of a k×k layer on one curve
(:data:`AUTO_METHODS`), so the allocation picks each layer's structure as well as its rank.
At equal MACs a CP layer keeps a far higher rank than a Tucker-2 one (its spatial part
is two depthwise convs), which wins on narrow layers; the cp prediction is optimistic,
so callers with data should also fit the plain tucker allocation and keep the better.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .calibrate import _sym_sqrt
from .convs import ConvGeometry, Site, module_kernel, oi_kernel
from .decompose import unfold
from .factors import FactorPlan, factor_cost, original_cost

__all__ = ["AUTO_METHODS", "Candidate", "layer_candidates", "allocate", "rank_grid", "predicted_kernel", "probe_points"]


#: The structures ``method="auto"`` chooses between for a k×k conv (1x1 convs always use svd).
AUTO_METHODS = ("tucker", "cp")


@dataclass(frozen=True)
class Candidate:
    """One way to treat a layer: its plan, MACs, predicted error² and (optionally) another cost.

    ``cost`` is what the allocation spends when the objective is not MACs (e.g. measured
    seconds, :mod:`passes.budget`); without it the allocation spends MACs.
    """

    plan: FactorPlan | None  # None: keep the original layer
    macs: int
    err2: float
    cost: float | None = None

    @property
    def price(self) -> float:
        """What the allocation spends on this candidate."""
        return self.macs if self.cost is None else self.cost


def rank_grid(full: int, multiple: int = 1, points: int = 28) -> list[int]:
    """Candidate ranks 1..full, denser at the low end, rounded up to ``multiple``."""
    vals = {full}
    for i in range(1, points + 1):
        r = max(1, math.ceil(full * (i / points) ** 1.5))
        if multiple > 1:
            r = min(full, multiple * math.ceil(r / multiple))
        vals.add(r)
    return sorted(vals)


def _tail_fractions(evals: Tensor) -> Tensor:
    """tail[r] = energy beyond the top r eigenvalues / total, for r = 0..n."""
    e = torch.sort(evals.clamp_min(0), descending=True).values
    total = float(e.sum())
    if total <= 0:
        return torch.zeros(e.numel() + 1, dtype=torch.float64)
    cum = torch.cat([e.new_zeros(1), torch.cumsum(e, 0)])
    return ((total - cum) / total).to(torch.float64).cpu()


def _sqrt_psd(c: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(c)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def layer_candidates(site: Site, method: str, in_shape: tuple[int, ...], c_in: Tensor | None,
                     c_out: Tensor | None, multiple: int = 1, out_scale: Tensor | None = None) -> list[Candidate]:
    """The candidate plans for one layer with their MACs and predicted error².

    The first is "keep it as it is"; the others are the plans that cost fewer MACs than it
    (a plan at the original's cost or above, e.g. tucker at full rank folded to one conv,
    can never beat keeping the layer, yet would be reported as a factorization).
    ``out_scale`` (per output channel: the following BN's |γ|/σ) measures errors in the
    normalized output space that the rest of the network sees. ``method="auto"`` gives
    the candidates of every structure in :data:`AUTO_METHODS` on one curve.
    """
    cands = _all_candidates(site, AUTO_METHODS if method == "auto" else (method,), in_shape, c_in, c_out,
                            multiple, out_scale)
    return [cands[0]] + [c for c in cands[1:] if c.macs < cands[0].macs]


def _all_candidates(site: Site, methods: tuple[str, ...], in_shape: tuple[int, ...], c_in: Tensor | None,
                    c_out: Tensor | None, multiple: int, out_scale: Tensor | None) -> list[Candidate]:
    """The "keep it" candidate, then every plan of each method in ``methods`` (spectra computed once)."""
    g = site.geometry
    w = oi_kernel(site.weight.detach(), g).to(torch.float64)
    cout = g.out_channels
    if out_scale is not None:
        d = out_scale.to(w.device, torch.float64)
        w = w * d.view(-1, *([1] * (w.dim() - 1)))
        if c_out is not None:
            c_out = c_out.to(w.device, torch.float64) * d[:, None] * d[None, :]
    base = original_cost(g, in_shape)[0]
    cands = [Candidate(None, base, 0.0)]
    root = _sqrt_psd(c_in.to(w.device)) if c_in is not None else None

    def cand(plan: FactorPlan, err2: float) -> Candidate:
        return Candidate(plan, factor_cost(g, plan, in_shape)[0], err2)

    if "svd" in methods:
        wm = w.reshape(cout, -1)
        if root is not None:
            kk = wm.shape[1] // root.shape[0]
            wm = (wm.reshape(cout, root.shape[0], kk).transpose(1, 2) @ root).transpose(1, 2).reshape(cout, -1)
        tail = _matrix_tails(wm)
        full = min(cout, wm.shape[1])
        cands += [cand(FactorPlan("svd", (r,)), float(tail[min(r, tail.numel() - 1)]))
                  for r in rank_grid(full, multiple, points=max(28, min(full, 256)))]  # 1-D: afford every rank
    if "tucker" not in methods and "cp" not in methods:
        return cands
    w1 = unfold(w, 1)
    m_in = root @ w1 @ w1.T @ root if root is not None else w1 @ w1.T
    tail_in = _tail_fractions(torch.linalg.eigvalsh((m_in + m_in.T) / 2))
    c_y = c_out.to(w.device) if c_out is not None else unfold(w, 0) @ unfold(w, 0).T
    tail_out = _tail_fractions(torch.linalg.eigvalsh((c_y + c_y.T) / 2))
    if "tucker" in methods:
        # Up to 48 ranks per mode (every rank of a small layer), so the budget can be met closely.
        cands += [cand(FactorPlan("tucker", (ro, ri)), float(tail_out[ro]) + float(tail_in[ri]))
                  for ro in rank_grid(cout, multiple, points=max(28, min(cout, 48)))
                  for ri in rank_grid(g.in_channels, multiple, points=max(28, min(g.in_channels, 48)))]
    if "cp" in methods:
        full = min(cout * g.in_channels * math.prod(g.kernel_size) // max(cout, g.in_channels),
                   4 * max(cout, g.in_channels))
        tail_mix = _mixed_tails(w, root)
        # The channel terms are 0 once R reaches both channel counts; the mixed
        # matricizations (rank <= R too) still charge the separable spatial part. A tiny
        # rank-decreasing term keeps higher ranks strictly better, so the allocation lands
        # on its target.
        cands += [cand(FactorPlan("cp", (r,)),
                       float(tail_out[min(r, cout)]) + float(tail_in[min(r, g.in_channels)])
                       + float(tail_mix[min(r, tail_mix.numel() - 1)]) + 1e-4 * (1 - r / full))
                  for r in rank_grid(full, multiple, points=max(28, min(full, 256)))]
    return cands


def _matrix_tails(m: Tensor) -> Tensor:
    """:func:`_tail_fractions` of the squared singular values of ``m`` (from its smaller Gram)."""
    return _tail_fractions(torch.linalg.eigvalsh(m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m))


def _mixed_tails(w: Tensor, root: Tensor | None) -> Tensor:
    """Tail fractions of the (C_out·k_j)×(C_in·∏_{i≠j} k_i) matricizations, one per spatial axis j (the largest).

    Why: every matricization of a rank-R CP kernel has rank <= R, and these are the ones
    that see its rank-1 spatial kernels (for 2-d: (C_out·k_h)×(C_in·k_w) and
    (C_out·k_w)×(C_in·k_h)); the channel unfoldings alone call a 3x3 kernel exact at R = C,
    which a rank-C CP seldom is. Input-whitened like the others.
    """
    wt = torch.einsum("oi...,ij->oj...", w, root) if root is not None else w
    co, ci, *k = wt.shape
    n = len(k)
    tails = []
    for j in range(n):
        rest = [2 + i for i in range(n) if i != j]
        tails.append(_matrix_tails(wt.permute(0, 2 + j, 1, *rest).reshape(co * k[j], -1)))
    size = min(t.numel() for t in tails)
    out = tails[0][:size]
    for t in tails[1:]:
        out = torch.maximum(out, t[:size])
    return out


def _top_eigvecs(m: Tensor, r: int) -> Tensor:
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return evecs[:, torch.argsort(evals, descending=True)[:r]]


def predicted_kernel(weight: Tensor, plan: FactorPlan, c_in: Tensor, c_out: Tensor,
                     out_scale: Tensor | None = None, geom: ConvGeometry | None = None) -> Tensor:
    """The full kernel of the truncation whose error :func:`layer_candidates` predicts.

    Why: swapping it into the model measures what that predicted error really costs at
    the output (:func:`passes.calibrate.probe_sensitivity`) without building factors.
    svd: whitened truncated SVD; tucker: output projection onto the top ``r_out``
    eigenvectors of the output covariance and whitened input projection onto the top
    ``r_in`` of the mode-1 unfolding; cp: the tucker projection at ranks capped by the
    channel counts (the same bound its prediction uses). ``geom`` (needed for transposed
    convs) says how ``weight`` is laid out; the result has the same layout.
    """
    w = (oi_kernel(weight.detach(), geom) if geom is not None else weight.detach()).to(torch.float64)
    cout, cin = w.shape[0], w.shape[1]
    d = (out_scale.to(w.device, torch.float64) if out_scale is not None
         else torch.ones(cout, dtype=torch.float64, device=w.device)).view(-1, *([1] * (w.dim() - 1)))
    ws = w * d
    c_in = c_in.to(w.device, torch.float64)
    root, inv_root = _sym_sqrt(c_in)
    if plan.method == "svd":
        (r,) = plan.ranks
        wk = ws.reshape(cout, cin, -1)
        wm = torch.einsum("ocx,cd->odx", wk, root).reshape(cout, -1)
        u, s, vh = torch.linalg.svd(wm, full_matrices=False)
        approx = ((u[:, :r] * s[:r]) @ vh[:r]).reshape(wk.shape)
        approx = torch.einsum("odx,dc->ocx", approx, inv_root).reshape(ws.shape)
    else:
        r_out, r_in = plan.ranks if plan.method == "tucker" else (min(plan.ranks[0], cout), min(plan.ranks[0], cin))
        u = _top_eigvecs(c_out.to(w.device, torch.float64) * d.view(-1, 1) * d.view(1, -1), r_out)
        w1 = root @ unfold(ws, 1)
        v = _top_eigvecs(w1 @ w1.T, r_in)
        p_in = inv_root @ v @ v.T @ root  # whitened projection on the input-channel mode
        approx = torch.einsum("oa,ai...,ci->oc...", u @ u.T, ws, p_in)
    approx = approx / d
    return (module_kernel(approx, geom) if geom is not None else approx).to(weight.dtype)


def probe_points(cands: list[Candidate], fractions: tuple[float, ...] = (0.75, 0.5, 0.3)) -> list[Candidate]:
    """Candidates on the predicted hull nearest to these fractions of the layer's cost.

    Why: a few points across the range the allocation will use are enough to calibrate
    a layer's predicted error curve against measured harm.
    """
    full = cands[0].price
    hull = [c for c in _hull(cands) if c.plan is not None and c.err2 > 0]
    picked: list[Candidate] = []
    for f in fractions:
        c = min(hull, key=lambda c: abs(c.price / max(full, 1) - f), default=None)
        if c is not None and c not in picked:
            picked.append(c)
    return picked


def _hull(cands: list[Candidate]) -> list[Candidate]:
    """Lower-left convex hull, from the costliest (least error) to the cheapest candidate."""
    pareto: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.price, c.err2)):  # cheaper first
        if not pareto or c.err2 < pareto[-1].err2:
            pareto.append(c)
    hull: list[Candidate] = []
    for c in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # keep b only if it lies strictly below the segment a-c
            cross = (b.price - a.price) * (c.err2 - a.err2) - (b.err2 - a.err2) * (c.price - a.price)
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(c)
    return hull[::-1]


def _amount(v: float) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def allocate(curves: dict[str, list[Candidate]], budget: float, fixed: float, *, what: str = "flops_target",
             unit: str = "conv MACs") -> dict[str, Candidate]:
    """Pick one candidate per layer so that ``fixed + Σ price ≤ budget``, minimising Σ err².

    Raises ``ValueError`` naming ``what`` (the budget's argument) when even the cheapest
    plans exceed it.
    """
    hulls = {k: _hull(v) for k, v in curves.items()}
    floor = fixed + sum(min(c.price for c in v) for v in curves.values())
    if floor > budget:
        raise ValueError(f"{what}: unreachable; the fewest {unit} convfx can reach here is "
                         f"{_amount(floor)} but the target allows {_amount(budget)}")
    pos = {k: 0 for k in hulls}
    total = fixed + sum(h[0].price for h in hulls.values())
    while total > budget:
        best, best_slope = None, math.inf
        for k, h in hulls.items():
            i = pos[k]
            if i + 1 < len(h):
                saved = h[i].price - h[i + 1].price
                slope = (h[i + 1].err2 - h[i].err2) / (saved if saved > 0 else 1)
                if slope < best_slope:
                    best, best_slope = k, slope
        if best is None:
            break
        total -= hulls[best][pos[best]].price - hulls[best][pos[best] + 1].price
        pos[best] += 1
    chosen = {k: hulls[k][pos[k]] for k in hulls}
    # Spend what the last coarse hull step left over: upgrade layers to costlier
    # Pareto points that still fit, least error first.
    slack = budget - total
    for k in sorted(curves, key=lambda k: -chosen[k].err2):
        cur = chosen[k]
        better = [c for c in curves[k] if c.err2 < cur.err2 and c.price - cur.price <= slack]
        if better:
            pick = min(better, key=lambda c: c.err2)
            slack -= pick.price - cur.price
            chosen[k] = pick
    return chosen
