"""Rank selection by empirical variational Bayesian matrix factorization (EVBMF).

Why: Tucker ranks of a conv kernel have to be chosen per layer without data.
EVBMF (Nakajima, Sugiyama, Babacan & Tomioka, JMLR 2013) has a closed-form global
solution for a fully observed matrix ``V = B A^T + noise``: once the noise variance
``sigma2`` is known, exactly the singular values above an analytic threshold survive.
``sigma2`` itself is estimated by minimising the free energy, a 1-D problem on a
bounded interval.  Applied to the mode-0 (``C_out x C_in*k*k``) and mode-1
(``C_in x C_out*k*k``) unfoldings of a kernel it gives the Tucker-2 ranks.

Derivation used here (L <= M, ``alpha = L / M``, ``x_h = gamma_h^2 / (M sigma2)``):
up to constants the EVB free energy as a function of ``sigma2`` is

    sum_h gamma_h^2 / (M sigma2) + L log(sigma2) + sum_{h: x_h > x_bar} psi(tau(x_h))

with ``tau(x)`` the larger root of ``tau^2 - (x - 1 - alpha) tau + alpha = 0``,
``psi(tau) = log(1 + tau) + alpha log(1 + tau / alpha) - tau`` (the free-energy gain
of keeping a component, negative past its root ``tau_bar``) and
``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)``.  A component is kept iff
``gamma_h > sqrt(M sigma2 x_bar)``.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> signal = torch.randn(40, 3, generator=g) @ torch.randn(3, 60, generator=g)
>>> evbmf_rank(signal + 0.1 * torch.randn(40, 60, generator=g))
3
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from passes.decompose import singular_values
from passes.errors import ConvfxError

__all__ = ["EVBMFResult", "evbmf", "evbmf_rank"]

log = logging.getLogger(__name__)

_GRID_POINTS = 256  # coarse log-spaced scan that brackets the global minimum
_GOLDEN_STEPS = 60  # golden-section refinement of the two best cells (0.618^60 ~ 3e-13)
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class EVBMFResult:
    """Outcome of :func:`evbmf`.

    ``rank`` is the raw EVB estimate (0 means "pure noise"; :func:`evbmf_rank`
    clamps it to >= 1), ``sigma2`` the estimated noise variance per entry and
    ``threshold`` the singular-value cut-off (values strictly above it are kept),
    both in the units of the input.  ``singular_values`` are sorted descending, in
    the input's dtype and on its device.
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: Tensor


def evbmf(matrix: Tensor) -> EVBMFResult:
    """EVB rank estimate of a 2-D ``matrix`` (any orientation, any scale).

    The matrix is transposed so that ``L <= M``; the noise variance is the minimiser
    of the EVB free energy over an interval known to contain it (a 256-point
    log-spaced scan, then golden-section refinement of the best bracket, all
    vectorised in torch).  Computed in float64 on the matrix's device; invariant to
    scaling the matrix.

    >>> import torch
    >>> m = torch.zeros(20, 200)
    >>> m[:3, :3] = 50 * torch.eye(3)
    >>> res = evbmf(m + 0.1 * torch.randn(20, 200, generator=torch.Generator().manual_seed(0)))
    >>> res.rank, int((res.singular_values > res.threshold).sum()), round(res.sigma2, 2)
    (3, 3, 0.01)
    """
    if not isinstance(matrix, Tensor):
        raise ValueError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.ndim != 2 or matrix.numel() == 0:
        raise ValueError(f"matrix must be a non-empty 2-D tensor, got shape {tuple(matrix.shape)}")
    if matrix.is_complex():
        raise ValueError(f"matrix must be real, got {matrix.dtype}")
    out_dtype = matrix.dtype if matrix.is_floating_point() else torch.get_default_dtype()
    v = matrix.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ConvfxError(
            "matrix contains NaN or Inf; cannot estimate its rank",
            hint="check the layer's weight for corrupted values",
        )
    if v.shape[0] > v.shape[1]:
        v = v.T
    n_rows, n_cols = v.shape  # L <= M
    s = singular_values(v)  # via the small Gram matrix: much faster on wide unfoldings
    energy = float((s * s).sum())
    if energy == 0.0:
        return EVBMFResult(0, 0.0, 0.0, s.to(out_dtype))

    alpha = n_rows / n_cols
    tau_bar = _tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    # Work in units where the pure-noise estimate sigma2 = energy / (L M) is 1:
    # everything below is then independent of the matrix's scale.
    unit = energy / (n_rows * n_cols)
    s2 = (s * s) / unit
    lower, upper = _sigma2_bounds(s2, n_rows, n_cols, x_bar)
    sigma2 = _minimize_log_bounded(
        lambda u: _free_energy(u, s2, n_rows, n_cols, alpha, x_bar),
        math.log(lower),
        math.log(upper),
        s2.device,
    )
    cut2 = n_cols * sigma2 * x_bar  # squared threshold in unit scale
    rank = int((s2 > cut2).sum())
    result = EVBMFResult(
        rank=rank,
        sigma2=float(sigma2) * unit,
        threshold=math.sqrt(float(cut2) * unit),
        singular_values=s.to(out_dtype),
    )
    log.debug("evbmf: %dx%d -> rank %d (sigma2 %.4g)", n_rows, n_cols, rank, result.sigma2)
    return result


def evbmf_rank(matrix: Tensor) -> int:
    """EVB rank of ``matrix``, at least 1 (a layer always keeps one component).

    >>> import torch
    >>> evbmf_rank(torch.zeros(3, 4))
    1
    """
    return max(1, evbmf(matrix).rank)


# --------------------------------------------------------------------------- internals


def _psi(tau: float, alpha: float) -> float:
    return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau


def _tau_bar(alpha: float) -> float:
    """Positive root of ``psi`` (about ``2.5129 sqrt(alpha)``), by bisection.

    ``psi(0) = 0``, ``psi'(0) = 1`` and ``psi`` is concave, so there is exactly one
    positive root.
    """
    lo, hi = 0.0, max(1.0, 4.0 * math.sqrt(alpha))
    while _psi(hi, alpha) > 0:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _psi(mid, alpha) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def _sigma2_bounds(s2: Tensor, n_rows: int, n_cols: int, x_bar: float) -> tuple[float, float]:
    """Interval that contains the EVB noise variance (unit scale).

    Upper: all energy is noise (``1`` in unit scale).  Lower: EVB keeps at most
    ``H = ceil(L / (1 + alpha)) - 1`` components, so the ``(H+1)``-th singular
    value is noise (``gamma^2 <= M sigma2 x_bar``) and so is the average tail energy.
    """
    alpha = n_rows / n_cols
    h_max = min(max(math.ceil(n_rows / (1.0 + alpha)) - 1, 0), n_rows - 1)
    tail = s2[h_max:]
    lower = max(float(s2[h_max]) / (n_cols * x_bar), float(tail.mean()) / n_cols)
    upper = 1.0
    # an exactly low-rank matrix has a zero tail: keep the log interval finite
    lower = min(max(lower, 1e-14 * upper), upper)
    return lower, upper


def _free_energy(log_sigma2: Tensor, s2: Tensor, n_rows: int, n_cols: int, alpha: float, x_bar: float) -> Tensor:
    """EVB free energy (up to constants) at each ``log sigma2`` (any shape)."""
    sigma2 = log_sigma2.exp()[..., None]
    x = s2 / (n_cols * sigma2)
    shifted = x - (1.0 + alpha)
    disc = (shifted * shifted - 4.0 * alpha).clamp_min(0.0)
    tau = 0.5 * (shifted + disc.sqrt())
    gain = torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau
    gain = torch.where(x > x_bar, gain, torch.zeros_like(gain))
    return (x + gain).sum(-1) + n_rows * log_sigma2


def _minimize_log_bounded(fn: Callable[[Tensor], Tensor], lo: float, hi: float, device: torch.device) -> Tensor:
    """``exp`` of the minimiser of ``fn`` over ``[lo, hi]`` (a log-variance interval).

    Robust to several local minima and kinks: a dense vectorised scan picks the best
    grid cell, golden-section search (branch-free, via ``torch.where``) refines
    inside its two neighbouring cells, and the better of scan and refinement wins.
    """
    if hi - lo <= 0:
        return torch.tensor(math.exp(hi), dtype=torch.float64, device=device)
    grid = torch.linspace(lo, hi, _GRID_POINTS, dtype=torch.float64, device=device)
    values = fn(grid)
    best = int(torch.argmin(values))
    a = grid[max(best - 1, 0)].clone()
    b = grid[min(best + 1, _GRID_POINTS - 1)].clone()
    c = b - _INV_PHI * (b - a)
    d = a + _INV_PHI * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(_GOLDEN_STEPS):
        left = fc <= fd  # minimum in [a, d]
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        c_new = b - _INV_PHI * (b - a)
        d_new = a + _INV_PHI * (b - a)
        c, d = c_new, d_new
        fc, fd = fn(c), fn(d)
    refined = 0.5 * (a + b)
    u = torch.where(fn(refined) <= values[best], refined, grid[best])
    return u.exp()
