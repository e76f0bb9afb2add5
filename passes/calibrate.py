"""Data-aware factor fitting: match each layer's outputs on calibration activations.

For a layer ``y = W x`` (a conv seen through its im2col patches, or a Linear), the fit
minimises ``Σ ‖W x_o − Ŵ x_c‖²`` where ``x_o`` is the layer's input in the original
model and ``x_c`` its input in the model compressed so far. Targets from the original
model let each layer correct the error its predecessors left. Only second moments are
kept (``C_cc = Σ x_c x_cᵀ``, ``C_oc = Σ x_o x_cᵀ``, ``C_oo = Σ x_o x_oᵀ``), streamed
batch by batch, so memory is O(D²) per layer with D = C_in·∏k, whatever the number of
images. Every conv type is fitted this way: 1-, 2- and 3-d, and transposed convs through the
im2col rows of the equivalent stride-1 conv (:func:`patches`); kernels are handled in the
(C_out, C_in, k...) layout (:func:`passes.convs.oi_kernel`).

Fits:

* ``svd`` / Linear — reduced-rank regression: the exact minimiser at rank r (SVD of the
  least-squares solution in the metric of the input covariance).
* ``tucker`` — the output factor spans the principal subspace of the target outputs, the
  input factor is the input-covariance-whitened leading subspace of the mode-1
  unfolding, and the core (then the output factor) are refitted by least squares.
* ``cp`` — data-free CP-ALS for the first three factors, then a least-squares refit of
  the last 1x1 conv on the data.

Every fit sees the moments shrunk towards the weight-space fit (:meth:`MomentStats.shrunk`,
``SHRINK``): a few hundred images leave many input directions barely excited, and an
unregularised solve puts large weights there that do not generalise.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .convs import ConvGeometry, module_kernel, oi_kernel
from .decompose import unfold
from .factors import chain_kernel, cp_components, output_size, pointwise_matrix

__all__ = [
    "MomentStats", "ChannelStats", "Frontier", "patches", "fit_factors", "output_error", "collect_moments",
    "channel_stats", "bn_output_scale", "SuffixWalk", "noise_sensitivity", "output_discrepancy", "probe_sensitivity",
]

_RIDGE = 1e-8
#: Default strength of :meth:`MomentStats.shrunk` in :func:`fit_factors`: small enough that
#: well-excited directions keep the data fit, large enough that barely excited ones keep
#: the weights (chosen side by side; see the README's ``calibration_shrink``).
SHRINK = 0.01


def _explicit_padding(geom: ConvGeometry) -> tuple[int, ...]:
    """Padding equal to what a plain conv does, in F.pad's order (last axis first, left then right)."""
    if geom.padding == "valid":
        return (0,) * (2 * geom.spatial)
    out: list[int] = []
    if geom.padding == "same":
        for d, k in zip(geom.dilation[::-1], geom.kernel_size[::-1]):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    for p in geom.padding[::-1]:  # type: ignore[union-attr]
        out += [p, p]
    return tuple(out)


def _padded(x: Tensor, geom: ConvGeometry) -> Tensor:
    pad = _explicit_padding(geom)
    if any(pad):
        mode = "constant" if geom.padding_mode == "zeros" else geom.padding_mode
        x = F.pad(x, pad, mode=mode)
    return x


def _stuffed(x: Tensor, geom: ConvGeometry) -> Tensor:
    """A transposed conv's input as the plain stride-1 conv with the flipped kernel sees it.

    Why: ``conv_transpose(x)`` equals that conv over ``x`` with ``stride - 1`` zeros between
    neighbours, padded by ``d(k-1) - p`` (``+ output_padding`` on the right; negative
    amounts crop), so its im2col rows are the rows of a plain conv.
    """
    n = geom.spatial
    size = [(i - 1) * s + 1 for i, s in zip(x.shape[2:], geom.stride)]
    out = x.new_zeros(*x.shape[:2], *size)
    out[(slice(None), slice(None), *(slice(None, None, s) for s in geom.stride))] = x
    pad: list[int] = []
    for j in reversed(range(n)):
        left = geom.dilation[j] * (geom.kernel_size[j] - 1) - geom.padding[j]  # type: ignore[index]
        pad += [left, left + geom.output_padding[j]]
    return F.pad(out, pad) if any(pad) else out


def _conv_input(x: Tensor, geom: ConvGeometry) -> tuple[Tensor, tuple[int, ...]]:
    """(padded input, stride) of the plain conv whose patches are the layer's input rows."""
    if geom.transposed:
        return _stuffed(x, geom), (1,) * geom.spatial
    return _padded(x, geom), geom.stride


def _rows(windows: Tensor, geom: ConvGeometry) -> Tensor:
    """(rows, C, k...) windows as feature rows ordered like the (C_out, C_in, k...) kernel's columns."""
    if geom.transposed:  # the stride-1 conv of :func:`_stuffed` runs over the flipped kernel
        windows = windows.flip(tuple(range(2, windows.dim())))
    return windows.reshape(windows.shape[0], -1)


def patches(x: Tensor, geom: ConvGeometry) -> Tensor:
    """The layer's input as rows of D features: im2col patches for convs (any spatial rank, plain
    or transposed; one row per output position), rows for Linears."""
    if geom.linear:
        return x.reshape(-1, x.shape[-1])
    xp, stride = _conv_input(x, geom)
    n = geom.spatial
    for j, (k, s, d) in enumerate(zip(geom.kernel_size, stride, geom.dilation)):
        xp = xp.unfold(2 + j, d * (k - 1) + 1, s)[..., ::d]  # (N, C, out..., rest..., k...)
    order = (0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))  # (N, out..., C, k...)
    win = xp.permute(order)
    return _rows(win.reshape(-1, *win.shape[1 + n:]), geom)


def sample_positions(x: Tensor, geom: ConvGeometry, rows: int, gen: torch.Generator) -> Tensor | None:
    """Random output positions (flat indices) to keep, or None to keep them all."""
    if geom.linear:
        total = x.reshape(-1, x.shape[-1]).shape[0]
    else:
        total = x.shape[0] * math.prod(output_size(tuple(x.shape[2:]), geom))
    if total <= rows:
        return None
    return torch.randperm(total, generator=gen)[:rows].sort().values


def sampled_patches(x: Tensor, geom: ConvGeometry, idx: Tensor | None) -> Tensor:
    """``patches(x, geom)[idx]`` without building the full im2col matrix."""
    if idx is None:
        return patches(x, geom)
    if geom.linear:
        return x.reshape(-1, x.shape[-1])[idx.to(x.device)]
    xp, stride = _conv_input(x, geom)
    out = output_size(tuple(x.shape[2:]), geom)
    n = geom.spatial
    rem = idx.to(x.device)
    starts = []
    for size, s in zip(reversed(out), reversed(stride)):  # unravel, last axis fastest
        starts.append((rem % size) * s)
        rem = rem // size
    starts.reverse()
    index: list[Tensor] = [rem.view(-1, *([1] * n))]  # the batch index
    for j, (i0, k, d) in enumerate(zip(starts, geom.kernel_size, geom.dilation)):
        pos = i0[:, None] + d * torch.arange(k, device=x.device)  # (rows, k_j)
        index.append(pos.view(-1, *(k if a == j else 1 for a in range(n))))
    win = xp.movedim(1, -1)[tuple(index)]  # (rows, k..., C)
    return _rows(win.movedim(-1, 1), geom)


@dataclass
class MomentStats:
    """Streaming second moments of (original, current) layer inputs, in float64."""

    dim: int
    device: torch.device
    c_cc: Tensor = field(init=False)
    c_oc: Tensor = field(init=False)
    c_oo: Tensor = field(init=False)
    rows: int = 0

    def __post_init__(self) -> None:
        z = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        self.c_cc, self.c_oc, self.c_oo = z, z.clone(), z.clone()

    def add(self, p_o: Tensor, p_c: Tensor) -> None:
        """Accumulate one batch of patch rows (same rows, original and current inputs)."""
        # float64 products: float32 rounding leaves the sums indefinite by ~1e-7 of their
        # largest entries, more than the ridge where activations span many magnitudes.
        p_o, p_c = p_o.to(torch.float64), p_c.to(torch.float64)
        self.c_cc += p_c.T @ p_c
        self.c_oc += p_o.T @ p_c
        self.c_oo += p_o.T @ p_o
        self.rows += p_o.shape[0]

    def shrunk(self, rho: float) -> MomentStats:
        """These moments plus ``λ I`` in all three, ``λ = rho · mean(diag C_cc)``.

        Why: that is what ``λ`` virtual isotropic input rows with ``x_o = x_c`` would add,
        rows on which the fit must reproduce ``W x`` exactly. Directions the calibration
        images barely excite then keep the original weights instead of whatever the
        least-squares solve puts there: a few hundred images otherwise over-fit (the
        fitted factors drift far from the original weights' norm). ``rho → 0`` is the pure
        data fit, ``rho → ∞`` the weight-space fit.
        """
        out = MomentStats(self.dim, self.device)
        lam = rho * float(torch.diagonal(self.c_cc).mean().clamp_min(0.0))
        eye = lam * torch.eye(self.dim, dtype=torch.float64, device=self.device)
        out.c_cc, out.c_oc, out.c_oo = self.c_cc + eye, self.c_oc + eye, self.c_oo + eye
        out.rows = self.rows
        return out


@dataclass
class ChannelStats:
    """Per-channel input covariance and output covariance of a layer (for allocation)."""

    c_in: Tensor  # (C_in, C_in)
    c_out: Tensor  # (C_out, C_out)


def _ridge(c: Tensor) -> Tensor:
    lam = _RIDGE * float(torch.diagonal(c).mean().clamp_min(1e-30))
    return c + lam * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def _cholesky(c: Tensor) -> Tensor:
    """Cholesky factor of a ridged covariance, adding jitter until it is positive definite."""
    scale = float(torch.diagonal(c).abs().max().clamp_min(1e-30))
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(c + jitter * torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
        if int(info) == 0:
            return chol
        jitter = scale * (1e-12 if jitter == 0.0 else jitter / scale * 100)
    raise torch.linalg.LinAlgError("calibration covariance is not positive definite even with jitter")


def _sym_sqrt(c: Tensor) -> tuple[Tensor, Tensor]:
    """(C^{1/2}, C^{-1/2}) of a symmetric PSD matrix, regularised."""
    evals, evecs = torch.linalg.eigh(_ridge(c))
    evals = evals.clamp_min(float(evals.max()) * 1e-12)
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


def output_error(w: Tensor, w_hat: Tensor, st: MomentStats) -> float:
    """Relative output error ‖W X_o − Ŵ X_c‖ / ‖W X_o‖ computed from the moments."""
    w = w.to(torch.float64)
    w_hat = w_hat.to(torch.float64)
    ref = float(torch.einsum("ij,jk,ik->", w, st.c_oo, w))
    err = ref - 2 * float(torch.einsum("ij,jk,ik->", w, st.c_oc, w_hat)) + float(
        torch.einsum("ij,jk,ik->", w_hat, st.c_cc, w_hat))
    return (max(err, 0.0) / ref) ** 0.5 if ref > 0 else 0.0


def _reduced_rank(w: Tensor, st: MomentStats, r: int) -> tuple[Tensor, Tensor]:
    """argmin_{rank Ŵ ≤ r} Σ‖W x_o − Ŵ x_c‖², as Ŵ = a @ b with balanced scales."""
    c = _ridge(st.c_cc)
    w_ls = torch.linalg.solve(c, (w @ st.c_oc).T).T  # W C_oc C_cc^{-1}
    chol = _cholesky(c)  # C = L Lᵀ
    u, s, vh = torch.linalg.svd(w_ls @ chol, full_matrices=False)
    r = min(r, s.numel())
    b0 = torch.linalg.solve_triangular(chol.T, vh[:r].T, upper=True).T  # V_rᵀ L^{-1}
    return _rebalanced(u[:, :r] * s[:r], b0)


def _rebalanced(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The same product a @ b, re-split by its own SVD so both factors carry √σ.

    Why: whitening (L^{-1}) or output scaling can leave one factor tiny and the other huge,
    which SGD fine-tuning cannot handle.
    """
    q, tri = torch.linalg.qr(b.T)  # b = triᵀ qᵀ
    u2, s2, vh2 = torch.linalg.svd(a @ tri.T, full_matrices=False)
    root = s2.clamp_min(float(s2[0]) * 1e-12 if s2.numel() else 1.0).sqrt()
    return u2 * root, (root[:, None] * vh2) @ q.T


def bn_output_scale(gm: torch.fx.GraphModule, node: torch.fx.Node, signed: bool = False) -> Tensor | None:
    """|γ| / sqrt(var + eps) of the BatchNorm that alone consumes ``node``'s output, if any.

    Why: BN rescales every output channel to unit variance, so a low-variance channel
    matters as much as a loud one; fitting and allocating in the BN-normalized metric
    stops rank cuts from silently erasing quiet channels. ``signed`` keeps γ's sign (the
    BN's actual slope, for mapping a change after it back to before it).
    """
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    bn = gm.get_submodule(str(users[0].target))
    if not isinstance(bn, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d | torch.nn.BatchNorm3d) or bn.running_var is None:
        return None
    scale = (bn.running_var.detach().to(torch.float64) + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64).abs()
    if not bool(torch.isfinite(scale).all()) or float(scale.max()) <= 0:
        return None
    scale = scale.clamp_min(float(scale.max()) * 1e-6)
    if signed and bn.weight is not None:
        scale = torch.where(bn.weight.detach() < 0, -scale, scale)
    return scale


def _channel_cov(st: MomentStats, cin: int) -> Tensor:
    kk = st.dim // cin
    c = st.c_cc.reshape(cin, kk, cin, kk)
    return torch.diagonal(c, dim1=1, dim2=3).mean(-1)


def _tucker_fit(w4: Tensor, geom: ConvGeometry, st: MomentStats, ranks: tuple[int, int],
                n_refit: int = 2) -> list[Tensor]:
    cout, cin, *k = w4.shape
    ones = (1,) * len(k)
    r_out, r_in = ranks
    wm = w4.reshape(cout, -1)
    # Output factor: principal subspace of the target outputs y = W x_o.
    c_yy = wm @ st.c_oo @ wm.T
    evals, evecs = torch.linalg.eigh(c_yy)
    u_out = evecs[:, torch.argsort(evals, descending=True)[:r_out]]
    # Input factor: leading subspace of the mode-1 unfolding in the input-covariance metric.
    root, inv_root = _sym_sqrt(_channel_cov(st, cin))
    w1 = unfold(w4, 1)  # (C_in, C_out k k)
    m = root @ w1 @ w1.T @ root
    ev, vec = torch.linalg.eigh((m + m.T) / 2)
    v = vec[:, torch.argsort(ev, descending=True)[:r_in]]
    p = v.T @ inv_root  # first 1x1 conv: (r_in, C_in)
    t = torch.kron(p, torch.eye(math.prod(k), dtype=p.dtype, device=p.device))  # patches → core patches
    c_zz = _ridge(t @ st.c_cc @ t.T)
    c_yz = wm @ st.c_oc @ t.T  # Σ y* zᵀ
    g = torch.linalg.solve(c_zz, (u_out.T @ c_yz).T).T  # core given an orthonormal u_out
    for _ in range(n_refit):
        # output factor given the core, then the core given the output factor
        h_cov = _ridge(g @ c_zz @ g.T)
        u_out = torch.linalg.solve(h_cov, (c_yz @ g.T).T).T
        gram = _ridge(u_out.T @ u_out)
        g = torch.linalg.solve(gram, torch.linalg.solve(c_zz, (u_out.T @ c_yz).T).T)
    # fit_factors re-expresses these with orthonormal outer factors (_orthonormal_tucker).
    return [p.reshape(r_in, cin, *ones), g.reshape(r_out, r_in, *k), u_out.reshape(cout, r_out, *ones)]


def _orthonormal_tucker(p: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The same Tucker-2 product with orthonormal input/output factors and the scale in the core.

    Why: the whitened fit leaves the first factor ~1e-2 and the core ~1e3; the product is
    right, but SGD on such badly scaled factors diverges at any usual learning rate.
    p = Rᵀ Qᵀ and u = Q₂ R₂ (QR factorizations), so u·g·p = Q₂ · (R₂ g Rᵀ) · Qᵀ.
    """
    q_in, r_in = torch.linalg.qr(p.T)  # p.T: (C_in, r_in)
    q_out, r_out = torch.linalg.qr(u)  # u: (C_out, r_out)
    core = torch.einsum("da,ab...,cb->dc...", r_out, g, r_in)
    return q_in.T.contiguous(), core, q_out


def _cp_last_refit(w4: Tensor, st: MomentStats, first: Tensor, stages: list[Tensor]) -> Tensor:
    r = first.shape[0]
    k = cp_components(first, stages).reshape(r, -1)
    wm = w4.reshape(w4.shape[0], -1)
    c_hh = _ridge(k @ st.c_cc @ k.T)
    last = torch.linalg.solve(c_hh, (wm @ st.c_oc @ k.T).T).T
    return last.reshape(w4.shape[0], r, *([1] * (w4.dim() - 2)))


def fit_factors(weight: Tensor, geom: ConvGeometry, method: str, ranks: tuple[int, ...],
                st: MomentStats, cp_init: list[Tensor] | None = None,
                out_scale: Tensor | None = None, shrink: float = SHRINK) -> tuple[list[Tensor], Tensor, float]:
    """Data-aware factor weights for one layer.

    ``out_scale`` (per output channel, e.g. :func:`bn_output_scale`) weights the output
    error; CP's last-factor refit solves each output channel separately, so it needs none.

    Returns ``(factor chain, Ŵ as a full kernel, relative output error)``: the chain in the
    (out, in, k...) layout (:func:`passes.factors.module_weights` stores it), Ŵ in the
    layer's own layout like ``weight``. ``cp_init`` carries the data-free CP chain when
    ``method == "cp"``.
    """
    raw = st
    if shrink > 0:
        st = st.shrunk(shrink)
    w = oi_kernel(weight.detach(), geom).to(torch.float64)
    cout = w.shape[0]
    ones = (1,) * (w.dim() - 2)
    d = (out_scale.to(w.device, torch.float64) if out_scale is not None
         else torch.ones(cout, dtype=torch.float64, device=w.device))
    dw = w * d.view(-1, *([1] * (w.dim() - 1)))  # fit in the output metric BN will see
    if method == "svd":
        a, b = _reduced_rank(dw.reshape(cout, -1), st, ranks[0])
        a, b = _rebalanced(a / d[:, None], b)
        w_hat = (a @ b).reshape(w.shape)
        out = [b, a] if geom.linear else [b.reshape(b.shape[0], *w.shape[1:]), a.reshape(cout, -1, *ones)]
    elif method == "tucker":
        p, g, u = _tucker_fit(dw, geom, st, (ranks[0], ranks[1]))
        p, g, u2 = _orthonormal_tucker(pointwise_matrix(p), g, pointwise_matrix(u) / d[:, None])
        out = [p.reshape(p.shape[0], -1, *ones), g, u2.reshape(cout, -1, *ones)]
        w_hat = chain_kernel("tucker", out)
    else:
        assert cp_init is not None
        first, *stages = (t.to(torch.float64) for t in cp_init[:-1])
        out = [first, *stages, _cp_last_refit(w, st, first, stages)]
        w_hat = chain_kernel("cp", out)
    err = output_error(w.reshape(cout, -1), w_hat.reshape(cout, -1), raw)  # on the real rows only
    return [t.to(weight.dtype).contiguous() for t in out], module_kernel(w_hat, geom).to(weight.dtype), err



class Frontier:
    """Runs one batch through a graph step by step, pausing before chosen nodes.

    Sequential calibration advances the original and the compressed graph together,
    layer by layer, so each layer's inputs are computed once (O(layers) work, not the
    O(layers²) of re-running prefixes). Only values still needed downstream are kept.
    The compressed graph may be rewritten while paused: execution resumes after the last
    node run, which is where the rewrite inserts a layer's factors.
    """

    def __init__(self, gm: torch.fx.GraphModule, batch: tuple[object, ...]) -> None:
        self.interp = torch.fx.Interpreter(gm)
        self.interp.args_iter = iter(batch)
        self.last: torch.fx.Node = gm.graph._root  # type: ignore[attr-defined]
        self.done: set[torch.fx.Node] = set()

    def _run(self, node: torch.fx.Node) -> None:
        env = self.interp.env
        env[node] = self.interp.run_node(node)
        self.done.add(node)
        for a in node.all_input_nodes:
            if a in env and all(u in self.done for u in a.users):
                del env[a]

    def run_until(self, name: str) -> Tensor:
        """Run up to (not including) the node called ``name``; return its first input."""
        node = self.last.next
        while node.op != "root":
            if node.name == name:
                first = node.args[0] if node.args else node.kwargs["input"]
                return self.interp.env[first]  # type: ignore[index,return-value]
            self._run(node)
            self.last = node
            node = node.next
        raise RuntimeError(f"node {name!r} was not reached")

    def value(self, name: str) -> Tensor | None:
        """The held value of the node called ``name``, if it was computed and is still needed."""
        for node, v in self.interp.env.items():
            if node.name == name:
                return v  # type: ignore[return-value]
        return None

    def rewritten(self, node: torch.fx.Node, first_input: Callable[[Tensor], Tensor]) -> None:
        """``node``, where this frontier is paused, was changed in place: map the value of its
        first input with ``first_input`` and re-read the attributes it already fetched."""
        env = self.interp.env
        env[node.args[0]] = first_input(env[node.args[0]])  # type: ignore[index]
        for a in node.all_input_nodes:
            if a.op == "get_attr" and a in env:
                env[a] = self.interp.fetch_attr(str(a.target))


def collect_moments(ref: list[Frontier], cur: list[Frontier], node_name: str, geom: ConvGeometry,
                    rows_per_batch: int = 4096, seed: int = 0) -> MomentStats:
    """Stream the moments of one layer's inputs: original model vs the compressed prefix.

    At most ``rows_per_batch`` random output positions per batch enter the moments (the
    same positions for both models), which bounds the cost on large feature maps.
    """
    st: MomentStats | None = None
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f_o, f_c in zip(ref, cur):
            x_o, x_c = f_o.run_until(node_name), f_c.run_until(node_name)
            idx = sample_positions(x_o, geom, rows_per_batch, gen)
            p_o, p_c = sampled_patches(x_o, geom, idx), sampled_patches(x_c, geom, idx)
            if st is None:
                st = MomentStats(p_o.shape[1], p_o.device)
            st.add(p_o, p_c)
    assert st is not None
    return st


class _ChannelRecorder(torch.fx.Interpreter):
    """One full pass that accumulates per-site channel statistics for rank allocation."""

    def __init__(self, gm: torch.fx.GraphModule, sites: dict[str, str], stats: dict[str, list[Tensor]]) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.sites = sites  # node name -> site fqn
        self.stats = stats

    def run_node(self, n: torch.fx.Node) -> object:
        out = super().run_node(n)
        fqn = self.sites.get(n.name)
        if fqn is not None:
            first = n.args[0] if n.args else n.kwargs["input"]
            x = self.env[first]  # type: ignore[index]
            xin = (x.reshape(-1, x.shape[-1]) if x.dim() == 2 else x.transpose(0, 1).reshape(x.shape[1], -1).T)
            y = out  # type: ignore[assignment]
            yo = (y.reshape(-1, y.shape[-1]) if y.dim() == 2 else y.transpose(0, 1).reshape(y.shape[1], -1).T)
            xd, yd = xin.to(torch.float64), yo.to(torch.float64)
            yd = yd - yd.mean(0)  # the bias is kept; only the varying part needs rank
            acc = self.stats.setdefault(fqn, [xd.new_zeros(xd.shape[1], xd.shape[1]),
                                              yd.new_zeros(yd.shape[1], yd.shape[1])])
            acc[0] += xd.T @ xd
            acc[1] += yd.T @ yd
        return out


def channel_stats(ref: torch.fx.GraphModule, node_to_site: dict[str, str],
                  batches: list[tuple[object, ...]]) -> dict[str, ChannelStats]:
    """Input-channel and output-channel covariances of every site on the original model."""
    acc: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for batch in batches:
            _ChannelRecorder(ref, node_to_site, acc).run(*batch)
    return {k: ChannelStats(v[0], v[1]) for k, v in acc.items()}


class SuffixWalk:
    """One forward pass that, at chosen nodes, can also run the rest of the graph differently.

    Why: sensitivity measurements change one layer and look at the model's output. The
    layers before it give the same values every time, so they run once; each change
    re-runs only the suffix from the changed node on (about half the work of a full
    forward pass on average). Values are freed after their last use, on the main pass
    and on every suffix run, so memory stays that of one forward pass.

    Iterating yields ``(node_name, run_rest)`` at each chosen node, in graph order, before
    that node runs on the main pass. ``run_rest(transform=None)`` runs the node and
    everything after it and returns the model's output; ``transform`` may replace the
    node's output. State changed around a ``run_rest`` call (e.g. a swapped kernel) must
    be restored before the iteration resumes; ``run_rest`` is valid only until then.
    """

    def __init__(self, gm: torch.fx.GraphModule, batch: tuple[object, ...], node_names: list[str]) -> None:
        self.interp = torch.fx.Interpreter(gm)
        self.interp.extra_traceback = False
        self.batch = batch
        self.nodes = list(gm.graph.nodes)
        index = {n.name: i for i, n in enumerate(self.nodes)}
        missing = set(node_names) - set(index)
        if missing:
            raise KeyError(f"nodes not in the graph: {sorted(missing)}")
        self.stops = sorted({index[name] for name in node_names})
        self.free_after: dict[int, list[torch.fx.Node]] = {}  # values whose last use is node i
        for i, n in enumerate(self.nodes):
            self.free_after.setdefault(max((index[u.name] for u in n.users), default=i), []).append(n)

    def __len__(self) -> int:
        return len(self.stops)

    def _step(self, env: dict[torch.fx.Node, Any], i: int, transform: Callable[[Any], Any] | None = None) -> Any:
        node = self.nodes[i]
        self.interp.env = env
        out = self.interp.run_node(node)
        if transform is not None:
            out = transform(out)
        env[node] = out
        for dead in self.free_after.get(i, ()):
            env.pop(dead, None)
        return out

    def __iter__(self) -> Iterator[tuple[str, Callable[..., Any]]]:
        env: dict[torch.fx.Node, Any] = {}
        self.interp.args_iter = iter(self.batch)
        done = 0  # nodes run on the main pass
        for stop in self.stops:
            for i in range(done, stop):
                self._step(env, i)
            done = stop

            def run_rest(transform: Callable[[Any], Any] | None = None, start: int = stop) -> Any:
                suffix_env = dict(env)
                out = None
                for j in range(start, len(self.nodes)):
                    out = self._step(suffix_env, j, transform if j == start else None)
                return out
            yield self.nodes[stop].name, run_rest


def _relative_noise(out: Any, eps: float, scale: Tensor | None) -> Any:
    """``out`` plus seeded Gaussian noise of relative energy eps² in the metric of ``scale``."""
    if not isinstance(out, Tensor) or out.dim() < 2:
        return out
    shape = [1, out.shape[1]] + [1] * (out.dim() - 2)
    d = (scale.to(out.device, out.dtype) if scale is not None
         else torch.ones(out.shape[1], dtype=out.dtype, device=out.device)).view(shape)
    rms = (out * d).pow(2).mean().sqrt()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    return out + noise * (eps * rms) / d


def noise_sensitivity(ref: torch.fx.GraphModule, node_to_site: dict[str, str], batch: tuple[object, ...],
                      scales: dict[str, Tensor | None], eps: float = 0.1,
                      wrap: Callable[[Any], Any] = iter) -> dict[str, float]:
    """How much each layer's relative output error is amplified at the model's output.

    Why: per-layer output errors are not equally harmful; an early layer's error runs
    through the whole network. For each site, noise of relative energy eps² (in the
    BN-normalized metric of ``scales``) is added to its output on one calibration batch,
    and the relative squared change of the model's output, divided by eps², is returned.
    Models whose output is not a single tensor get no entry (the allocation then weights
    every layer alike).
    """
    out: dict[str, float] = {}
    with torch.no_grad():
        base = ref(*batch)
        if not isinstance(base, Tensor):
            return out
        ref_energy = float(base.double().pow(2).sum().clamp_min(1e-30))
        for name, run_rest in wrap(SuffixWalk(ref, batch, list(node_to_site))):
            scale = scales.get(node_to_site[name])
            y = run_rest(lambda t, scale=scale: _relative_noise(t, eps, scale))
            # a layer called at several nodes keeps its last call's figure
            out[node_to_site[name]] = float((y - base).double().pow(2).sum()) / ref_energy / eps**2
    return out


def output_discrepancy(y: Tensor, base: Tensor) -> float:
    """How far ``y`` is from ``base``: mean KL of the softmaxes for (N, classes) logits, else relative MSE."""
    y, base = y.detach().double(), base.detach().double()
    if base.dim() == 2 and base.shape[1] > 1:
        ref = torch.log_softmax(base, 1)
        return float((ref.exp() * (ref - torch.log_softmax(y, 1))).sum(1).mean())
    return float((y - base).pow(2).sum() / base.pow(2).sum().clamp_min(1e-30))


@contextlib.contextmanager
def _swapped_kernel(gm: torch.fx.GraphModule, fqn: str, kernel: Tensor) -> Iterator[None]:
    """Temporarily give the layer ``gm.get_submodule(fqn)`` another kernel of the same shape."""
    weight = gm.get_submodule(fqn).weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.copy_(kernel.to(weight))
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def probe_sensitivity(gm: torch.fx.GraphModule, probes: dict[str, list[tuple[float, Tensor]]],
                      batch: tuple[object, ...], node_to_site: dict[str, str] | None = None,
                      wrap: Callable[[Any], Any] = iter) -> dict[str, float]:
    """Measured harm per unit of predicted error, for each layer.

    Why: a layer's predicted output error says nothing about how much of it survives to
    the model's output; an early layer's error runs through the whole network, a residual
    branch's is diluted. ``probes[fqn]`` lists (predicted error², approximate kernel)
    pairs; each kernel is swapped into the layer (``gm.get_submodule(fqn).weight``) in
    turn, the model's output on ``batch`` is compared with the unmodified output
    (:func:`output_discrepancy`), and the least-squares slope of harm over predicted
    error² is returned. Only the graph from the layer's first use on is re-run
    (:class:`SuffixWalk`); ``node_to_site`` names the nodes that use each layer (default:
    the ``call_module`` nodes of the probed layers). Weights are restored afterwards, also on error. Models whose
    output is not a single tensor get no entries (the allocation then weights every layer
    alike). ``wrap`` may wrap the per-layer loop (e.g. in a progress bar).
    """
    if node_to_site is None:
        node_to_site = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.target in probes}
    first_call: dict[str, str] = {}
    for n in gm.graph.nodes:
        if node_to_site.get(n.name) in probes:
            first_call.setdefault(node_to_site[n.name], n.name)
    missing = set(probes) - set(first_call)
    if missing:
        raise KeyError(f"no node uses the probed layers {sorted(missing)}")
    fqn_of = {name: fqn for fqn, name in first_call.items()}
    out: dict[str, float] = {}
    with torch.no_grad():
        base = gm(*batch)
        if not isinstance(base, Tensor):
            return out
        for name, run_rest in wrap(SuffixWalk(gm, batch, list(fqn_of))):
            fqn = fqn_of[name]
            harm = []
            for err2, kernel in probes[fqn]:
                with _swapped_kernel(gm, fqn, kernel):
                    harm.append((err2, output_discrepancy(run_rest(), base)))
            den = sum(e * e for e, _ in harm)
            if den > 0:
                out[fqn] = max(sum(e * h for e, h in harm) / den, 1e-12)
    return out
