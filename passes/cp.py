"""Fast CP (CANDECOMP/PARAFAC) decomposition, tuned for convolution kernels.

Why this exists: the CP-decomposed convolution of Lebedev et al. (2015) replaces a
``C_out x C_in x k_h x k_w`` kernel by ``rank`` rank-one terms, i.e. four thin
convolutions.  Generic CP solvers spend most of their time building huge
Khatri-Rao products; here every sweep costs two dense matrix products with the
kernel (against Khatri-Rao products of half the modes, ~sqrt(size) rows each) and
a few tiny ``rank x rank`` solves, and the starting point exploits the tiny
spatial modes of conv kernels (see :func:`cp_als`).

>>> import torch
>>> w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
>>> res = cp_als(w, rank=32)
>>> res.reconstruct().shape
torch.Size([16, 8, 3, 3])
>>> first, vertical, horizontal, last, err = cp_conv_factors(w, rank=32)
>>> [tuple(t.shape) for t in (first, vertical, horizontal, last)]
[(32, 8, 1, 1), (32, 1, 3, 1), (32, 1, 1, 3), (16, 32, 1, 1)]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from passes.errors import ConvfxError

__all__ = ["CPResult", "cp_als", "cp_conv_factors"]

log = logging.getLogger(__name__)

_INITS = ("auto", "slices", "svd", "random")
# "slices" init enumerates every multi-index of the small modes; 3x3 kernels have 9,
# 7x7 kernels 49.  Beyond this many slices it falls back to the "svd" init.
_MAX_SLICES = 64
# Relative Tikhonov ridge added to the (unit-diagonal) normal-equation matrices.
# Small enough to leave exact decompositions exact (~1e-9 relative), large enough
# to keep Cholesky alive and to damp the diverging components of degenerate fits.
_RIDGE = 1e-10
# Damping of the main phase: a relative ridge on the same matrices. Lossy fits of conv
# kernels otherwise drift into degenerate solutions whose components cancel each other
# (component norms far above the kernel's), and degenerate factors are untrainable (SGD
# diverges from them). Damping keeps the fit out of that basin but biases it: where the
# least-squares optimum is not degenerate (noisy low-rank kernels) it costs real error.
_DAMPING = 1e-2
# So the damped fit is then polished undamped, one accepted sweep at a time, and the
# polish stops before the first iterate whose degeneracy (CPResult.degeneracy:
# ||weights|| / ||reconstruction||, 1 for orthogonal components whatever the rank) would
# exceed _MAX_DEGENERACY.  At 1.5 the components' cross terms cancel at most
# 1 - 1/1.5**2 (56%) of their energy, about where the damped fits of pretrained CIFAR
# ResNets already are (and they fine-tune); undamped fits of the same kernels are far
# beyond it, with the untrainable factors described above.  Well-posed fits (a low-rank
# kernel plus noise) converge below the bound, so the polish reaches the least-squares
# optimum; where undamped fits degenerate it keeps the lowest-error iterate within the
# bound, never worse than the damped fit.  Measurements: benchmarks/results/decompose_speed.md.
_MAX_DEGENERACY = 1.5
# Fits that end the damped phase below _POLISH_BELOW are near-exact: they reproduce the
# kernel itself, and are polished without the bound so that exact decompositions stay exact.
_POLISH_BELOW = 2e-2
# The Gram-based error subtracts squared norms, so it resolves relative errors down
# to ~1e-8 only; below this the fit is exact at float32 precision anyway.
_ERROR_FLOOR = 1e-7
# Mixed precision: while the fit is still coarse, the one big GEMM per half-sweep
# (tensor x Khatri-Rao) and the MTTKRPs read from its result run in float32 -- about
# twice as fast on CPUs -- and everything else (Grams, solves) stays float64.  A
# perturbation of the MTTKRP moves the least-squares fit only to second order, and
# the tracked error stays far above float32 rounding (~1e-7).
# Switched to float64 for good once the error is below _FAST_UNTIL, or the stopping
# rule fires, or a plain sweep fails to lower the error (the first float64 sweep is then
# accepted unconditionally: float32 error estimates are not comparable with float64
# ones near 1e-3); tiny problems (where the GEMM is not the cost) never use it.
_FAST_UNTIL = 1e-3
_FAST_MIN_WORK = 1 << 20  # tensor entries x rank
# Extrapolation ("momentum") schedule between ALS sweeps: grow on success,
# shrink (and restart from the last accepted iterate) on failure.
_BETA_START = 0.5
_BETA_GROW = 1.05
_BETA_SHRINK = 1.5
_BETA_CAP = 1.0


@dataclass(frozen=True)
class CPResult:
    """A rank-``R`` CP model ``sum_r weights[r] * a_r (x) b_r (x) ...`` (Kruskal form).

    ``factors[i]`` has shape ``(I_i, R)`` with unit-norm columns; the scale of every
    component lives in ``weights`` (shape ``(R,)``, non-negative, sorted descending),
    so the factors stay comparable and callers choose where to put the scale
    (:func:`cp_conv_factors` splits it evenly across the four convolutions).

    ``rel_error`` is the exact ``||T - T_hat||_F / ||T||_F`` of the returned model,
    ``n_iter`` the number of ALS sweeps run and ``converged`` whether the stopping
    rule fired before ``n_iter_max`` (in a polish the degeneracy bound stopped, it is
    ``False``).

    >>> import torch
    >>> a, b = torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    >>> res = cp_als(a @ b.T, rank=2)
    >>> torch.allclose(res.reconstruct(), a @ b.T)
    True
    """

    weights: Tensor
    factors: list[Tensor]
    rel_error: float
    n_iter: int
    converged: bool = True

    @property
    def rank(self) -> int:
        """Number of rank-one components."""
        return int(self.weights.shape[0])

    def reconstruct(self) -> Tensor:
        """Dense tensor ``sum_r weights[r] * outer(factors[0][:, r], factors[1][:, r], ...)``."""
        return _reconstruct(self.weights, self.factors)

    @property
    def degeneracy(self) -> float:
        """``||weights||_2 / ||T_hat||_F``: how much the components cancel each other.

        Why: degenerate CP fits reach a low error with huge components of opposite signs
        whose sum is small, and such factors cannot be fine-tuned.  The ratio is 1 for
        mutually orthogonal components whatever the rank or the weight spectrum, below 1
        when they add up, and grows without bound as they cancel.  Computed from the
        factor Grams (no dense reconstruction); ``inf`` for non-zero weights that sum to
        nothing, 0 for an all-zero model.
        """
        return _degeneracy(self.weights, self.factors)


def cp_als(
    tensor: Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    init: str = "auto",
    seed: int = 0,
    damping: float = _DAMPING,
    max_degeneracy: float = _MAX_DEGENERACY,
) -> CPResult:
    """Rank-``rank`` CP decomposition of an N-way tensor by accelerated ALS.

    Why it is fast:

    * each sweep splits the modes into two balanced groups; contracting the tensor
      with one group's factors (one dense GEMM against the small Khatri-Rao
      product of that group alone, ~sqrt(tensor size) rows) gives every MTTKRP of
      the other group, so a sweep costs two GEMMs with the tensor instead of N;
    * the normal equations use the Hadamard product of the factor Grams and are
      solved by Cholesky with a tiny ridge (eigen-pseudo-inverse if that fails);
    * the error is tracked from the Grams (no reconstruction per sweep), and
      sweeps are extrapolated with an adaptive momentum that is undone whenever
      it does not lower the error;
    * ``init="slices"`` (the ``"auto"`` choice for conv kernels) rotates the small
      modes onto their HOSVD bases, splits the tensor into ``k_h * k_w`` matrix
      slices and keeps the ``rank`` largest singular triplets over all slices:
      an exact CP expansion truncated optimally for that structure, which works
      for any rank, including ranks larger than every mode.

    Other ``init`` values: ``"svd"`` (leading left singular vectors of each
    unfolding, random columns beyond the mode size) and ``"random"``.
    ``damping`` is a relative Tikhonov ridge on the normal equations: it keeps lossy fits
    away from degenerate solutions whose components cancel each other (huge factors that
    fine-tuning cannot train), at the price of a biased fit.  The damped fit is then
    polished undamped (up to ``n_iter_max`` more sweeps) for as long as its
    :attr:`CPResult.degeneracy` stays at most ``max_degeneracy``: the result is the
    least-squares fit where that is not degenerate, else the lowest-error iterate within
    the bound, and never worse than the damped fit.  A damped fit below 2% error is
    polished without the bound, so exact decompositions stay exact.
    ``max_degeneracy=0`` keeps every lossy damped fit as it is (the behaviour before the
    polish existed), ``math.inf`` polishes to the least-squares fit whatever it is, and
    ``damping=0`` is plain least-squares ALS (no phases, no bound).
    Sweeps stop after ``n_iter_max``, or when a sweep lowers the relative error by
    less than ``tol`` times its value, or once it is below 1e-7 (the resolution of
    the Gram-based estimate).  ALS only finds a local optimum; ``seed`` drives the
    random parts of the start.  Runs in float64 on ``tensor``'s device; the result
    has ``tensor``'s dtype.  Raises ``ValueError`` for bad arguments and
    :class:`~passes.errors.ConvfxError` for a tensor with NaN/Inf.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> f = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (6, 5, 3, 3)]
    >>> t = torch.einsum("ar,br,cr,dr->abcd", *f)
    >>> cp_als(t, rank=3).rel_error < 1e-6
    True
    """
    _check_rank(rank)
    data, out_dtype = _as_float64(tensor, "tensor")
    if not isinstance(n_iter_max, int) or isinstance(n_iter_max, bool) or n_iter_max < 0:
        raise ValueError(f"n_iter_max must be a non-negative int, got {n_iter_max!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite float >= 0, got {tol!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < 1:
        raise ValueError(f"damping must be a float in [0, 1), got {damping!r}")
    if (isinstance(max_degeneracy, bool) or not isinstance(max_degeneracy, (int, float))
            or math.isnan(max_degeneracy) or max_degeneracy < 0):
        raise ValueError(f"max_degeneracy must be a float >= 0 (inf allowed), got {max_degeneracy!r}")

    norm2 = float((data * data).sum())
    if norm2 == 0.0:
        weights = torch.zeros(rank, dtype=torch.float64, device=data.device)
        factors = _random_unit_factors(data.shape, rank, _generator(seed, data.device))
        return _finish(weights, factors, 0.0, 0, True, out_dtype)

    weights, factors = _initialize(data, rank, init, seed)
    ridge = max(float(damping), _RIDGE)
    weights, factors, n_iter, converged = _als(data, norm2, weights, factors, n_iter_max, tol, ridge)
    rel_error = float(torch.linalg.vector_norm(data - _reconstruct(weights, factors))) / math.sqrt(norm2)
    if ridge > _RIDGE and n_iter_max > 0:
        bound = math.inf if rel_error < _POLISH_BELOW else float(max_degeneracy)
        damped_error, damped_degeneracy = rel_error, _degeneracy(weights, factors)
        if damped_degeneracy <= bound:  # else no polished iterate could be kept
            weights, factors, more, converged = _als(
                data, norm2, weights, factors, n_iter_max, tol, _RIDGE, max_degeneracy=bound
            )
            n_iter += more
            rel_error = float(torch.linalg.vector_norm(data - _reconstruct(weights, factors))) / math.sqrt(norm2)
        log.debug(
            "cp_als: damped fit rel error %.4e degeneracy %.3f; polished (bound %.3g) %.4e",
            damped_error, damped_degeneracy, bound, rel_error,
        )
    log.debug(
        "cp_als: shape %s rank %d: %d sweeps, rel error %.4e, converged=%s",
        tuple(data.shape),
        rank,
        n_iter,
        rel_error,
        converged,
    )
    return _finish(weights, factors, rel_error, n_iter, converged, out_dtype)


def cp_conv_factors(weight: Tensor, rank: int, **kw: object) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """The four weights of a Lebedev CP convolution approximating ``weight``.

    ``weight`` is ``(C_out, C_in, k_h, k_w)``; ``kw`` goes to :func:`cp_als`.
    Returns ``(first, vertical, horizontal, last, rel_error)`` with shapes
    ``(R, C_in, 1, 1)``, ``(R, 1, k_h, 1)``, ``(R, 1, 1, k_w)`` and ``(C_out, R, 1, 1)``.
    Chaining a 1x1 conv with ``first``, a depthwise (``groups=R``) ``k_h x 1`` conv
    with ``vertical`` (vertical padding/stride/dilation of the original), a
    depthwise ``1 x k_w`` conv with ``horizontal`` (horizontal ones) and a 1x1 conv
    with ``last`` (plus the original bias) equals the original conv with the CP
    kernel.  Each component's weight is split as ``weight**(1/4)`` over the four
    factors, so no single factor carries extreme magnitudes.

    >>> import torch
    >>> w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    >>> first, vertical, horizontal, last, err = cp_conv_factors(w, rank=27)
    >>> err < 1e-6
    True
    """
    if not isinstance(weight, Tensor) or weight.ndim != 4:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 4-D conv kernel (C_out, C_in, k_h, k_w), got {shape}")
    res = cp_als(weight, rank, **kw)  # type: ignore[arg-type]
    scale = res.weights.to(torch.float64).clamp_min(0).pow(0.25)
    out_f, in_f, v_f, h_f = (f.to(torch.float64) * scale for f in res.factors)
    r = res.rank
    dtype = res.weights.dtype
    first = in_f.T.reshape(r, -1, 1, 1).to(dtype)
    vertical = v_f.T.reshape(r, 1, -1, 1).to(dtype)
    horizontal = h_f.T.reshape(r, 1, 1, -1).to(dtype)
    last = out_f.reshape(-1, r, 1, 1).to(dtype)
    return first, vertical, horizontal, last, res.rel_error


# --------------------------------------------------------------------------- validation


def _as_float64(tensor: object, name: str) -> tuple[Tensor, torch.dtype]:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_complex():
        raise ValueError(f"{name} must be real, got {tensor.dtype}")
    if tensor.ndim < 2 or tensor.numel() == 0:
        raise ValueError(f"{name} must have >= 2 non-empty modes, got shape {tuple(tensor.shape)}")
    out_dtype = tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()
    data = tensor.detach().to(torch.float64)
    if not bool(torch.isfinite(data).all()):
        raise ConvfxError(
            f"{name} contains NaN or Inf; cannot decompose it",
            hint="check the checkpoint (or the layer's weight) for corrupted values",
        )
    return data, out_dtype


def _check_rank(rank: object) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")


def _finish(
    weights: Tensor,
    factors: list[Tensor],
    rel_error: float,
    n_iter: int,
    converged: bool,
    dtype: torch.dtype,
) -> CPResult:
    order = torch.argsort(weights, descending=True)
    return CPResult(
        weights=weights[order].to(dtype),
        factors=[f[:, order].to(dtype) for f in factors],
        rel_error=rel_error,
        n_iter=n_iter,
        converged=converged,
    )


# --------------------------------------------------------------------------- basics


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _normalize_columns(a: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` with unit-norm columns, and the norms (zero columns stay zero)."""
    norms = torch.linalg.vector_norm(a, dim=0)
    return a / norms.clamp_min(1e-300), norms


def _random_unit_factors(shape: torch.Size, rank: int, gen: torch.Generator) -> list[Tensor]:
    return [
        _normalize_columns(torch.randn(n, rank, generator=gen, dtype=torch.float64, device=gen.device))[0]
        for n in shape
    ]


def _degeneracy(weights: Tensor, factors: list[Tensor]) -> float:
    """``||weights|| / ||T_hat||`` from the factor Grams (see :attr:`CPResult.degeneracy`)."""
    w = weights.to(torch.float64)
    gram = _hadamard([f.to(torch.float64).T @ f.to(torch.float64) for f in factors])
    model2 = float(w @ gram @ w)
    return _ratio(float(w @ w), model2)


def _ratio(weights2: float, model2: float) -> float:
    """``sqrt(weights2 / model2)``, with 0/0 = 0 and x/0 = inf (rounding can make ``model2 <= 0``)."""
    if weights2 <= 0.0:
        return 0.0
    return math.sqrt(weights2 / model2) if model2 > 0.0 else math.inf


def _reconstruct(weights: Tensor, factors: list[Tensor]) -> Tensor:
    """Dense tensor of a Kruskal model: one GEMM between two balanced half Khatri-Rao products."""
    shape = [f.shape[0] for f in factors]
    left, right = _balanced_split(shape)
    dense = (_khatri_rao([factors[n] for n in left]) * weights) @ _khatri_rao([factors[n] for n in right]).T
    dense = dense.reshape([shape[n] for n in left + right])
    return dense.permute(*[(left + right).index(n) for n in range(len(shape))])


def _balanced_split(shape: list[int]) -> tuple[list[int], list[int]]:
    """Two groups of modes whose size products are as equal as a greedy split makes them."""
    order = sorted(range(len(shape)), key=lambda n: (-shape[n], n))
    groups: tuple[list[int], list[int]] = ([], [])
    sizes = [1, 1]
    for n in order:
        g = 0 if sizes[0] <= sizes[1] else 1
        groups[g].append(n)
        sizes[g] *= shape[n]
    return sorted(groups[0]), sorted(groups[1])


def _khatri_rao(factors: list[Tensor]) -> Tensor:
    """Column-wise Kronecker product, first factor slowest (C order)."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


def _leading_basis(unfolded: Tensor) -> Tensor:
    """All left singular vectors of ``unfolded`` (rows <= cols), strongest first."""
    gram = unfolded @ unfolded.T
    _, vecs = torch.linalg.eigh(gram)
    return vecs.flip(-1)


def _unfold(t: Tensor, mode: int) -> Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


# --------------------------------------------------------------------------- init


def _initialize(t: Tensor, rank: int, init: str, seed: int) -> tuple[Tensor, list[Tensor]]:
    gen = _generator(seed, t.device)
    if init == "auto":
        init = "slices" if _n_slices(t.shape) <= _MAX_SLICES else "svd"
    if init == "slices":
        return _init_slices(t, rank, gen)
    ones = torch.ones(rank, dtype=torch.float64, device=t.device)
    if init == "random":
        return ones, _random_unit_factors(t.shape, rank, gen)
    factors = []
    for mode, size in enumerate(t.shape):
        basis = _leading_basis(_unfold(t, mode))[:, :rank]
        if rank > size:
            extra = torch.randn(size, rank - size, generator=gen, dtype=torch.float64, device=t.device)
            basis = torch.cat([basis, _normalize_columns(extra)[0]], dim=1)
        factors.append(basis)
    return ones, factors


def _two_largest(shape: torch.Size) -> tuple[int, int]:
    order = sorted(range(len(shape)), key=lambda n: (-shape[n], n))
    p, q = sorted(order[:2])
    return p, q


def _n_slices(shape: torch.Size) -> int:
    p, q = _two_largest(shape)
    return math.prod(s for n, s in enumerate(shape) if n not in (p, q))


def _init_slices(t: Tensor, rank: int, gen: torch.Generator) -> tuple[Tensor, list[Tensor]]:
    """Exact orthogonal CP expansion over the small modes' HOSVD bases, truncated to ``rank``.

    With ``U_s`` an orthonormal basis of each small mode ``s`` (everything but the two
    largest modes ``p, q``), ``T = sum_k S_k (x) (outer products of U_s columns)`` where
    the ``S_k`` are ``I_p x I_q`` matrices; their SVDs make it a sum of orthogonal
    rank-one terms, so keeping the ``rank`` largest singular values over all slices
    is the best approximation with this structure.
    """
    shape = t.shape
    p, q = _two_largest(shape)
    small = [n for n in range(t.ndim) if n not in (p, q)]
    bases = {s: _leading_basis(_unfold(t, s)) for s in small}
    core = t
    for s in small:  # rotate the small modes onto their bases
        core = torch.tensordot(core, bases[s], dims=([s], [0])).movedim(-1, s)
    n_slices = math.prod(shape[s] for s in small)
    slices = core.permute(p, q, *small).reshape(shape[p], shape[q], n_slices).permute(2, 0, 1)
    transpose = shape[p] > shape[q]  # eigen-decompose the smaller Gram
    if transpose:
        slices = slices.mT
    gram = slices @ slices.mT
    evals, evecs = torch.linalg.eigh(gram)  # ascending per slice
    m = evals.shape[-1]
    take = min(rank, n_slices * m)
    vals, idx = torch.topk(evals.clamp_min(0).reshape(-1), take)
    k_idx, j_idx = idx // m, idx % m
    sigma = vals.sqrt()
    left = evecs[k_idx, :, j_idx].T  # (rows, take)
    right = torch.empty(slices.shape[-1], take, dtype=torch.float64, device=t.device)
    for k in range(n_slices):  # v = S_k^T u / sigma, one GEMM per slice for its columns
        cols = (k_idx == k).nonzero().squeeze(1)
        if cols.numel():
            right[:, cols] = slices[k].mT @ left[:, cols]
    right, norms = _normalize_columns(right)
    good = norms > 1e-12 * max(float(sigma[0]), 1e-300)
    if not bool(good.all()):  # zero singular values: any unit vector will do
        fill = torch.randn(right.shape, generator=gen, dtype=torch.float64, device=t.device)
        right = torch.where(good, right, _normalize_columns(fill)[0])
    if transpose:
        left, right = right, left
    factors: list[Tensor] = [torch.empty(0)] * t.ndim
    factors[p], factors[q] = left, right
    rem = k_idx
    for s in reversed(small):  # unravel the slice index, last small mode fastest
        factors[s] = bases[s][:, rem % shape[s]]
        rem = rem // shape[s]
    weights = sigma
    if take < rank:
        pad = _random_unit_factors(shape, rank - take, gen)
        factors = [torch.cat([f, e], dim=1) for f, e in zip(factors, pad, strict=True)]
        weights = torch.cat([weights, weights.new_zeros(rank - take)])
    return weights, factors


# --------------------------------------------------------------------------- ALS


class _Sweeper:
    """One ALS sweep over all modes, organised as a two-group dimension tree.

    Modes are split into two groups of balanced size.  The MTTKRPs of every mode of
    group A come from one ``(A dims..., R)`` partial result: the tensor, matricised
    as ``(A modes) x (B modes)``, times the Khatri-Rao product of B's factors.  That
    Khatri-Rao product has only ``~sqrt(numel) x R`` entries (for a conv kernel:
    ``C_in * k_w x R``), so it is formed explicitly and the contraction is a single
    GEMM without temporaries bigger than the partial result; then the roles swap.
    Within a group, the Hadamard product of the other group's Grams is formed once.
    """

    def __init__(self, t: Tensor, fast: bool = False, ridge: float = _RIDGE) -> None:
        shape = list(t.shape)
        self.shape = shape
        self.groups = _balanced_split(shape)
        self.first_mode = self.groups[0][0]  # its incoming value is never read
        # mats[g]: the tensor as (modes of the other group) x (modes of group g), C order,
        # i.e. what contracting group g's factors needs
        self.mats: list[Tensor] = []
        for g in (0, 1):
            kept = self.groups[1 - g]
            rows = math.prod(shape[n] for n in kept)
            self.mats.append(t.permute(*kept, *self.groups[g]).reshape(rows, -1).contiguous())
        self.ridge = ridge
        self.ridge_eye: Tensor | None = None
        # float32 copies for the coarse phase (see _FAST_UNTIL); dropped when it ends
        self.fast_mats = [m.float() for m in self.mats] if fast else None

    @property
    def fast(self) -> bool:
        return self.fast_mats is not None

    def leave_fast(self) -> None:
        """Use float64 for every remaining sweep."""
        self.fast_mats = None

    def _contract_group(self, g: int, factors: list[Tensor]) -> Tensor:
        """Tensor contracted with group ``g``'s factors: shape (other group dims..., R)."""
        kr = _khatri_rao([factors[n] for n in self.groups[g]])
        if self.fast_mats is not None:  # stays float32: the MTTKRPs are formed from it in float32
            y = self.fast_mats[g] @ kr.float()
        else:
            y = self.mats[g] @ kr
        return y.reshape(*[self.shape[n] for n in self.groups[1 - g]], kr.shape[1])

    @staticmethod
    def _mttkrp(partial: Tensor, group: list[int], factors: list[Tensor], mode: int) -> Tensor:
        """MTTKRP of ``mode`` (float64) from its group's partial result (float32 or float64)."""
        if len(group) == 1:
            return partial.double()
        dtype = partial.dtype
        if len(group) == 2:  # the usual case (conv kernels): one broadcast and a reduction
            if mode == group[0]:
                return (partial * factors[group[1]].to(dtype)).sum(dim=1).double()
            return (partial * factors[group[0]][:, None, :].to(dtype)).sum(dim=0).double()
        factors = [f.to(dtype) for f in factors]
        letters = "abcdefghijklmnopqrstuvwxyz"
        sub = "".join(letters[i] for i in range(len(group)))
        operands: list[Tensor] = [partial]
        subs = [sub + "Z"]
        for i, n in enumerate(group):
            if n != mode:
                operands.append(factors[n])
                subs.append(letters[i] + "Z")
        out = letters[group.index(mode)] + "Z"
        return torch.einsum(",".join(subs) + "->" + out, *operands).double()

    def sweep(self, factors: list[Tensor]) -> tuple[list[Tensor], Tensor, float, float]:
        """Update every factor once.

        Returns unit factors, weights, ``||T - T_hat||^2 - ||T||^2`` and the degeneracy
        ``||weights|| / ||T_hat||`` (both from the Grams of the last update, for free).
        """
        factors = list(factors)
        grams: list[Tensor | None] = [None if n == self.first_mode else f.T @ f for n, f in enumerate(factors)]
        rank = factors[0].shape[1]
        if self.ridge_eye is None or self.ridge_eye.shape[0] != rank:
            # the factors have (nearly) unit columns, so the normal matrices have unit diagonals
            self.ridge_eye = self.ridge * torch.eye(rank, dtype=factors[0].dtype, device=factors[0].device)
        mttkrp = gram_other = unnorm = factors[0]
        for g in (0, 1):
            group = self.groups[g]
            partial = self._contract_group(1 - g, factors)
            # Hadamard product of the other group's Grams (fixed while this group updates)
            fixed = _hadamard([grams[n] for n in self.groups[1 - g]])
            for mode in group:
                mttkrp = self._mttkrp(partial, group, factors, mode)
                gram_other = _hadamard([fixed, *(grams[n] for n in group if n != mode)])
                unnorm = _solve_normal(gram_other, mttkrp, self.ridge_eye)
                factors[mode], weights = _normalize_columns(unnorm)
                grams[mode] = factors[mode].T @ factors[mode]
        # ||T - T_hat||^2 = ||T||^2 - 2 <T, T_hat> + ||T_hat||^2 from the last update
        inner = (mttkrp * unnorm).sum()
        model2 = float((gram_other * (unnorm.T @ unnorm)).sum())
        return factors, weights, model2 - 2 * float(inner), _ratio(float(weights @ weights), model2)


def _hadamard(mats: list[Tensor | None]) -> Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = out * m  # type: ignore[operator]
    assert out is not None
    return out


def _solve_normal(gram: Tensor, rhs: Tensor, ridge_eye: Tensor) -> Tensor:
    """``rhs @ inv(gram)`` for symmetric PSD ``gram`` with unit-scale diagonal.

    Cholesky of ``gram + ridge * I`` and one ``cholesky_solve`` of the transposed
    system (which also returns ``rhs``'s row-major layout, keeping later broadcasts
    and reshapes copy-free); an eigen pseudo-inverse if Cholesky still fails.
    """
    chol, info = torch.linalg.cholesky_ex(gram + ridge_eye)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    log.debug("cp_als: Cholesky failed (info=%d); using eigen pseudo-inverse", int(info))
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = evals.max().clamp_min(0) * gram.shape[0] * torch.finfo(gram.dtype).eps
    inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
    return ((rhs @ evecs) * inv) @ evecs.T


def _als(
    t: Tensor, norm2: float, weights: Tensor, factors: list[Tensor], n_iter_max: int, tol: float,
    ridge: float = _RIDGE, max_degeneracy: float = math.inf,
) -> tuple[Tensor, list[Tensor], int, bool]:
    """Extrapolated ALS; returns weights, unit factors, sweeps run and convergence flag.

    Stops (not converged) before accepting an iterate whose degeneracy exceeds
    ``max_degeneracy``, returning the last accepted one (initially ``weights, factors``).
    """
    rank = factors[0].shape[1]
    fast = t.numel() * rank >= _FAST_MIN_WORK and torch.get_float32_matmul_precision() == "highest"
    sweeper = _Sweeper(t, fast=fast, ridge=ridge)
    current, cur_weights = factors, weights
    previous: list[Tensor] | None = None
    err_cur = math.inf
    start = current
    beta, beta_cap = _BETA_START, _BETA_CAP
    extrapolated = False
    converged = False
    n_iter = 0
    while n_iter < n_iter_max:
        n_iter += 1
        new, new_weights, sq, degeneracy = sweeper.sweep(start)
        err_new = math.sqrt(max(sq + norm2, 0.0) / norm2)
        accept = err_new <= err_cur or not math.isfinite(err_cur)
        if accept and degeneracy > max_degeneracy:
            if not extrapolated:
                log.debug("cp_als: sweep %d would reach degeneracy %.3f > %.3g; stopping", n_iter, degeneracy,
                          max_degeneracy)
                break
            accept = False  # the extrapolation overshot the bound: retry a plain sweep, as on failure below
        if accept:
            if extrapolated:
                beta = min(beta_cap, beta * _BETA_GROW)
            previous, current, cur_weights = current, new, new_weights
            err_old, err_cur = err_cur, err_new
            stop = err_cur < _ERROR_FLOOR or (err_old - err_cur) < tol * err_old
            if sweeper.fast and (stop or err_cur < _FAST_UNTIL):
                # let float64 sweeps confirm (or continue) from here: a plain sweep first,
                # accepted unconditionally, since the float32 phase's error estimate is
                # only good to ~1e-7 * ||T||^2 and must not be compared with float64 ones
                sweeper.leave_fast()
                start, extrapolated, err_cur = current, False, math.inf
                continue
            if stop:
                converged = True
                break
            if beta > 0 and previous is not None:
                # c + beta (c - p) for every factor the next sweep reads (the first
                # updated one is overwritten before use); the sweep's solves are
                # scale-equivariant, so no renormalisation is needed
                start = [
                    c if n == sweeper.first_mode else torch.lerp(p, c, 1.0 + beta)
                    for n, (c, p) in enumerate(zip(current, previous, strict=True))
                ]
                extrapolated = True
            else:
                start, extrapolated = current, False
        elif not extrapolated:  # a plain ALS sweep cannot increase the error: rounding level
            if sweeper.fast:  # (float32 rounding level: confirm in float64, as above)
                sweeper.leave_fast()
                start, err_cur = current, math.inf
                continue
            converged = True
            break
        else:  # the extrapolated start made things worse: undo it, be more careful
            beta_cap = max(beta, _BETA_START / 4)
            beta /= _BETA_SHRINK
            start, extrapolated = current, False
    return cur_weights, current, n_iter, converged
