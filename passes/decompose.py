"""Data-free low-rank math for conv kernels: Tucker-2 (HOSVD + HOOI) and truncated SVD.

All routines compute in float64 on the weight's device and return tensors in the input
dtype, so that full-rank factorizations reproduce the original layer to float tolerance.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "unfold", "leading_subspace", "tucker2", "truncated_svd", "singular_values", "energy_rank",
    "relative_error",
]


def unfold(w: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding: rows indexed by that mode, columns by all others.

    >>> unfold(torch.zeros(8, 4, 3, 3), 1).shape
    torch.Size([4, 72])
    """
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def leading_subspace(m: Tensor, r: int) -> Tensor:
    """Orthonormal basis (rows x r) of the top-``r`` left singular subspace of ``m``.

    Uses the eigendecomposition of the (rows x rows) Gram matrix when ``m`` is wide: conv
    unfoldings are very wide, and this is far cheaper than their SVD.
    """
    rows, cols = m.shape
    if cols >= rows:
        evals, evecs = torch.linalg.eigh(m @ m.T)
        return evecs[:, torch.argsort(evals, descending=True)[:r]]
    if r > cols:  # tall and beyond its column rank: complete the basis
        u, _, _ = torch.linalg.svd(m, full_matrices=True)
        return u[:, :r]
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r]


def _power_step(gram: Tensor, basis: Tensor) -> Tensor:
    """One subspace-iteration step: an orthonormal basis of ``gram @ basis``."""
    q, _ = torch.linalg.qr(gram @ basis)
    return q


def tucker2(w: Tensor, ranks: tuple[int, int], n_iter: int = 5, tol: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 of a conv kernel (C_out, C_in, k...) of any spatial rank over its channel modes (Kim et al. 2015).

    Returns ``(core, u_out, u_in)`` with ``w ≈ core ×0 u_out ×1 u_in``:
    ``core`` is (r_out, r_in, k...), ``u_out`` (C_out, r_out), ``u_in`` (C_in, r_in), both
    with orthonormal columns. HOSVD initialisation, then HOOI sweeps in which each
    factor takes one subspace-iteration step (a matrix product and a thin QR instead of
    a full eigendecomposition), until the fit stops improving by more than ``tol``.

    >>> w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    >>> core, uo, ui = tucker2(w, (16, 8))
    >>> torch.allclose(torch.einsum("oihw,ao,bi->abhw", core, uo, ui), w)
    True
    """
    r_out, r_in = ranks
    wd = w.detach().to(torch.float64)
    u_out = leading_subspace(unfold(wd, 0), r_out)
    u_in = leading_subspace(unfold(wd, 1), r_in)
    exact = r_out >= wd.shape[0] and r_in >= wd.shape[1]
    norm2 = float(wd.pow(2).sum())
    prev_fit = -1.0
    for _ in range(0 if exact else n_iter):
        y_out = unfold(torch.einsum("oi...,ib->ob...", wd, u_in), 0)
        u_out = _power_step(y_out @ y_out.T, u_out)
        y_in = unfold(torch.einsum("oi...,oa->ai...", wd, u_out), 1)
        u_in = _power_step(y_in @ y_in.T, u_in)
        fit = float((u_in.T @ y_in).pow(2).sum()) / norm2 if norm2 > 0 else 1.0
        if prev_fit >= 0 and abs(fit - prev_fit) <= tol * max(fit, 1e-30):
            break
        prev_fit = fit
    core = torch.einsum("oi...,oa,ib->ab...", wd, u_out, u_in)
    return core.to(w.dtype), u_out.to(w.dtype), u_in.to(w.dtype)


def _gram_eig(m: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Eigenpairs of the smaller Gram matrix of ``m``, largest first.

    Returns ``(sigma^2, basis, left)``: ``left`` says whether ``basis`` spans the column
    space (m mᵀ) or the row space (mᵀ m). Conv weight matrices are far from square, and
    the small Gram's eigendecomposition is several times cheaper than an SVD.
    """
    left = m.shape[0] <= m.shape[1]
    gram = m @ m.T if left else m.T @ m
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    return evals[order].clamp_min(0), evecs[:, order], left


def truncated_svd(m: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``m ≈ a @ b`` with ``a`` (rows x r) and ``b`` (r x cols), singular values split evenly.

    Splitting sqrt(S) into both factors keeps their scales balanced, which matters for
    fine-tuning and low-precision inference. At full rank ``a @ b`` equals ``m`` exactly
    (up to rounding), because the product is ``m`` times an orthogonal projector.

    >>> m = torch.randn(6, 4, dtype=torch.float64)
    >>> a, b = truncated_svd(m, 4)
    >>> torch.allclose(a @ b, m)
    True
    """
    md = m.detach().to(torch.float64)
    s2, basis, left = _gram_eig(md)
    r = min(r, basis.shape[1])  # the rank of m is at most min(rows, cols)
    s = s2[:r].sqrt()
    scale = s.clamp_min(float(s[0]) * 1e-8 if s.numel() and float(s[0]) > 0 else 1.0).sqrt()
    q = basis[:, :r]
    if left:  # m ≈ q qᵀ m
        a, b = q * scale, (q.T @ md) / scale[:, None]
    else:  # m ≈ m q qᵀ
        a, b = (md @ q) / scale, scale[:, None] * q.T
    return a.to(m.dtype), b.to(m.dtype)


def singular_values(m: Tensor) -> Tensor:
    """Singular values of ``m`` (descending, float64) via the smaller Gram matrix."""
    s2, _, _ = _gram_eig(m.detach().to(torch.float64))
    return s2.sqrt()


def energy_rank(m: Tensor, fraction: float) -> int:
    """Smallest rank whose singular values keep ``fraction`` of the squared energy (>= 1)."""
    s2, _, _ = _gram_eig(m.detach().to(torch.float64))
    energy = torch.cumsum(s2, 0)
    total = float(energy[-1]) if energy.numel() else 0.0
    if total <= 0:
        return 1
    r = int(torch.searchsorted(energy, torch.tensor(fraction * total, dtype=energy.dtype,
                                                   device=energy.device))) + 1
    return max(1, min(r, s2.numel()))


def relative_error(w: Tensor, w_hat: Tensor) -> float:
    """‖W − Ŵ‖ / ‖W‖ in float64 (0 for an all-zero W reproduced exactly)."""
    wd = w.detach().to(torch.float64)
    num = float(torch.linalg.vector_norm(wd - w_hat.detach().to(torch.float64)))
    den = float(torch.linalg.vector_norm(wd))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den
