"""Tests for passes.cp: CP-ALS accuracy, monotonicity in rank, conv factors, validation."""

from __future__ import annotations

import itertools
import math
import string

import pytest
import torch
import torch.nn.functional as F

from passes.cp import CPResult, cp_als, cp_conv_factors
from passes.errors import ConvfxError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kruskal(factors: list[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
    letters = string.ascii_lowercase[: len(factors)]
    spec = ",".join(f"{c}z" for c in letters)
    if weights is None:
        return torch.einsum(f"{spec}->{letters}", *factors)
    return torch.einsum(f"{spec},z->{letters}", *factors, weights)


def _low_rank(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return _kruskal([torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape])


def _rel(t: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t - approx) / torch.linalg.vector_norm(t))


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _khatri_rao_explicit(mats: list[torch.Tensor]) -> torch.Tensor:
    """Materialised column-wise Kronecker product (first matrix slowest)."""
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, m.shape[1])
    return out


def reference_als(t: torch.Tensor, rank: int, n_iter: int, seed: int = 0) -> float:
    """Textbook ALS: random init, explicit Khatri-Rao products, pseudo-inverse solves."""
    g = _gen(seed)
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in t.shape]
    for _ in range(n_iter):
        for mode in range(t.ndim):
            others = [factors[m] for m in range(t.ndim) if m != mode]
            kr = _khatri_rao_explicit(others)  # rows ordered like the C-order unfolding
            gram = torch.ones(rank, rank, dtype=torch.float64)
            for m in others:
                gram = gram * (m.T @ m)
            factors[mode] = _unfold(t, mode) @ kr @ torch.linalg.pinv(gram)
    return _rel(t, _kruskal(factors))


# These tensors are tiny: extra threads only add synchronisation (and contention).
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- (a) recovery


@pytest.mark.parametrize(
    ("shape", "rank"),
    [((12, 10, 3, 3), 4), ((8, 7, 5), 3), ((9, 6, 3, 3), 6), ((5, 4, 3, 3), 6), ((6, 5), 2)],
)
def test_recovers_exact_low_rank_and_beats_reference(shape: tuple[int, ...], rank: int) -> None:
    t = _low_rank(shape, rank, seed=sum(shape) + rank)
    res = cp_als(t, rank, n_iter_max=200)
    assert res.rel_error < 1e-6
    assert _rel(t, res.reconstruct()) == pytest.approx(res.rel_error, abs=1e-12)
    ref = reference_als(t, rank, n_iter=200)
    assert res.rel_error <= ref + 1e-6


@pytest.mark.parametrize("init", ["auto", "slices", "svd", "random"])
def test_every_init_recovers_exact_rank(init: str) -> None:
    t = _low_rank((10, 8, 3, 3), 5, seed=3)
    res = cp_als(t, 5, init=init, n_iter_max=400)
    assert res.rel_error < 1e-6


def test_result_layout_and_dtype() -> None:
    t = _low_rank((7, 6, 3, 3), 3, seed=1).float()
    res = cp_als(t, 5)
    assert isinstance(res, CPResult) and res.rank == 5
    assert res.weights.dtype == torch.float32 and res.weights.shape == (5,)
    assert [tuple(f.shape) for f in res.factors] == [(7, 5), (6, 5), (3, 5), (3, 5)]
    assert all(f.dtype == torch.float32 for f in res.factors)
    assert bool((res.weights[:-1] >= res.weights[1:]).all()) and bool((res.weights >= 0).all())
    for f in res.factors:  # unit-norm columns; the scale lives in the weights
        torch.testing.assert_close(f.norm(dim=0), torch.ones(5), atol=1e-5, rtol=0)
    dense = _kruskal([f.double() for f in res.factors], res.weights.double())
    torch.testing.assert_close(res.reconstruct().double(), dense, atol=1e-5, rtol=1e-5)
    assert 1 <= res.n_iter <= 100


def test_deterministic_for_a_seed() -> None:
    w = torch.randn(10, 9, 3, 3, generator=_gen(0), dtype=torch.float64)
    a, b = cp_als(w, 7, init="random", seed=3), cp_als(w, 7, init="random", seed=3)
    assert a.rel_error == b.rel_error
    torch.testing.assert_close(a.factors[0], b.factors[0], rtol=0, atol=0)


@pytest.mark.parametrize(("shape", "rank"), [((4, 3, 3, 3), 50), ((6, 5, 3, 3), 64), ((3, 2, 2), 9)])
def test_rank_larger_than_every_mode(shape: tuple[int, ...], rank: int) -> None:
    w = torch.randn(shape, generator=_gen(rank), dtype=torch.float64)
    res = cp_als(w, rank)
    assert [f.shape[1] for f in res.factors] == [rank] * len(shape)
    assert torch.isfinite(res.weights).all()
    assert res.rel_error < 1e-3  # enough terms for an (almost) exact fit


def test_zero_tensor() -> None:
    res = cp_als(torch.zeros(4, 3, 3, 3), 2)
    assert res.rel_error == 0.0
    assert torch.count_nonzero(res.reconstruct()) == 0


@pytest.mark.parametrize("fast", [False, True])
def test_mixed_precision_phase_keeps_accuracy(monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    """The float32-GEMM coarse phase (normally only for big layers) must not cost accuracy."""
    import passes.cp as cp_module

    monkeypatch.setattr(cp_module, "_FAST_MIN_WORK", 0 if fast else 1 << 62)
    exact = _low_rank((12, 10, 3, 3), 4, seed=9)
    assert cp_als(exact, 4, n_iter_max=200).rel_error < 1e-6  # float64 finishes the job
    w = torch.randn(16, 12, 3, 3, generator=_gen(4), dtype=torch.float64)
    monkeypatch.setattr(cp_module, "_FAST_MIN_WORK", 1 << 62)
    reference = cp_als(w, 20, n_iter_max=60).rel_error
    monkeypatch.setattr(cp_module, "_FAST_MIN_WORK", 0 if fast else 1 << 62)
    assert cp_als(w, 20, n_iter_max=60).rel_error == pytest.approx(reference, rel=1e-4)


def _reference_mttkrp(t: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    others = [factors[m] for m in range(t.ndim) if m != mode]
    return _unfold(t, mode) @ _khatri_rao_explicit(others)


@pytest.mark.parametrize("shape", [(6, 5), (8, 7, 5), (9, 6, 3, 3), (5, 4, 3, 2, 3)])
@pytest.mark.parametrize("fast", [False, True])
def test_sweeper_mttkrps_match_explicit_khatri_rao(shape: tuple[int, ...], fast: bool) -> None:
    """Every MTTKRP of the dimension-tree sweep (one GEMM per group against the explicit
    Khatri-Rao product of the other group) equals the textbook unfolding @ Khatri-Rao,
    in float64 and (to float32 accuracy) in the float32 coarse phase; groups of 1, 2, 3 modes."""
    import passes.cp as cp_module

    g = _gen(len(shape))
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    rank = 4
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    sweeper = cp_module._Sweeper(t, fast=fast)
    assert sweeper.fast == fast
    tol = {"rtol": 1e-5, "atol": 1e-5} if fast else {"rtol": 1e-10, "atol": 1e-10}
    for g_idx in (0, 1):
        group = sweeper.groups[g_idx]
        partial = sweeper._contract_group(1 - g_idx, factors)
        assert partial.dtype == (torch.float32 if fast else torch.float64)
        for mode in group:
            got = sweeper._mttkrp(partial, group, factors, mode)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, _reference_mttkrp(t, factors, mode), **tol)


@pytest.mark.parametrize("shape", [(12, 10, 7), (7, 6, 3, 3, 2)])
def test_mixed_precision_phase_recovers_exact_rank_for_other_orders(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]
) -> None:
    """3-way (single-mode group) and 5-way (einsum MTTKRP) tensors through the float32 phase."""
    import passes.cp as cp_module

    monkeypatch.setattr(cp_module, "_FAST_MIN_WORK", 0)
    t = _low_rank(shape, 3, seed=11)
    res = cp_als(t, 3, n_iter_max=300)
    assert res.rel_error < 1e-6
    assert res.rel_error <= reference_als(t, 3, n_iter=300) + 1e-6


# --------------------------------------------------------------------------- (b) rank sweep


def test_error_non_increasing_in_rank_and_reaches_exact() -> None:
    w = torch.randn(8, 6, 3, 3, generator=_gen(0), dtype=torch.float64)
    ranks = [1, 2, 4, 8, 16, 24, 32, 54]
    errors = [cp_als(w, r, n_iter_max=300).rel_error for r in ranks]
    for lo, hi in itertools.pairwise(errors):
        assert hi <= lo + 1e-7, errors
    assert errors[0] > 0.5
    assert errors[ranks.index(32)] < 1e-3, errors  # below the 8*6*9/17 ~ 26 parameter bound + slack
    assert errors[-1] < 1e-8  # 9 slices x rank 6 = 54 terms represent any 8x6x3x3 kernel


@pytest.mark.parametrize("rank", [16, 48])
def test_beats_reference_on_a_conv_like_weight(rank: int) -> None:
    w = torch.randn(16, 12, 3, 3, generator=_gen(rank), dtype=torch.float64) * math.sqrt(2 / (12 * 9))
    ours = cp_als(w, rank, n_iter_max=100).rel_error
    assert ours <= reference_als(w, rank, n_iter=100) + 1e-9


def _cancellation(res: CPResult) -> float:
    """Sum of the component norms over the norm of their sum: >> sqrt(R) means components cancel."""
    return float(res.weights.abs().sum() / res.reconstruct().norm())


def _noisy_low_rank(shape: tuple[int, ...], rank: int, noise: float, seed: int) -> torch.Tensor:
    """An exactly rank-``rank`` tensor plus i.i.d. noise of ``noise`` times its norm."""
    t = _low_rank(shape, rank, seed)
    n = torch.randn(t.shape, generator=_gen(seed + 1000), dtype=torch.float64)
    return t + noise * t.norm() / n.norm() * n


def _border_rank(shape: tuple[int, ...], noise: float, seed: int) -> torch.Tensor:
    """``sum_k a (x) .. b (in mode k) .. (x) a`` (plus noise): rank N, border rank 2.

    Its best rank-2 approximation does not exist: the infimum is approached only by two
    components that grow without bound and cancel each other, the textbook degenerate fit.
    """
    g = _gen(seed)
    a = [torch.randn(n, generator=g, dtype=torch.float64) for n in shape]
    b = [torch.randn(n, generator=g, dtype=torch.float64) for n in shape]
    t = sum(_kruskal([(b if i == k else a)[i][:, None] for i in range(len(shape))]) for k in range(len(shape)))
    n = torch.randn(shape, generator=g, dtype=torch.float64)
    return t + noise * t.norm() / n.norm() * n


def parafac_like(t: torch.Tensor, rank: int, n_iter_max: int = 100, tol: float = 1e-8) -> float:
    """Stand-in for tensorly's ``parafac(t, rank, init="svd", n_iter_max=100)`` (tensorly is a
    benchmark-only dependency): leading left singular vectors of each unfolding (uniform
    random columns beyond the mode size), plain least-squares ALS, stop when the relative
    error changes by less than ``tol``."""
    g = _gen(0)
    factors = []
    for mode, size in enumerate(t.shape):
        u = torch.linalg.svd(_unfold(t, mode), full_matrices=False)[0][:, :rank]
        if rank > size:
            u = torch.cat([u, torch.rand(size, rank - size, generator=g, dtype=torch.float64)], dim=1)
        factors.append(u)
    err = prev = math.inf
    for _ in range(n_iter_max):
        for mode in range(t.ndim):
            others = [factors[m] for m in range(t.ndim) if m != mode]
            gram = torch.ones(rank, rank, dtype=torch.float64)
            for m in others:
                gram = gram * (m.T @ m)
            rhs = _unfold(t, mode) @ _khatri_rao_explicit(others)
            factors[mode] = torch.linalg.lstsq(gram, rhs.T).solution.T
        prev, err = err, _rel(t, _kruskal(factors))
        if abs(prev - err) < tol:
            break
    return err


@pytest.mark.parametrize(("shape", "rank", "seed"), [((24, 20, 3, 3), 8, 1), ((32, 32, 3, 3), 12, 1)])
def test_default_matches_plain_als_on_noisy_low_rank(shape: tuple[int, ...], rank: int, seed: int) -> None:
    """A low-rank kernel plus 5% noise has a well-posed least-squares fit: the default (damped,
    then polished within the degeneracy bound) must reach it, i.e. be no worse than plain ALS
    from an SVD start (tensorly's parafac), where damping alone stays measurably worse."""
    t = _noisy_low_rank(shape, rank, 0.05, seed)
    reference = parafac_like(t, rank)
    default = cp_als(t, rank)
    damped_only = cp_als(t, rank, max_degeneracy=0.0)
    assert default.rel_error <= reference * (1 + 1e-6)
    assert damped_only.rel_error > reference * 1.2  # what the polish fixes
    assert default.degeneracy < 1.5


def test_degeneracy_guard_engages_on_a_border_rank_tensor() -> None:
    """Undamped polishing of a rank-2 fit of a border-rank-2 tensor runs off into cancelling
    components; the bound stops it within 1.5, still improving on the damped fit."""
    t = _border_rank((6, 5, 3, 3), noise=0.1, seed=0)
    default = cp_als(t, 2)
    unbounded = cp_als(t, 2, max_degeneracy=math.inf)
    damped_only = cp_als(t, 2, max_degeneracy=0.0)
    assert unbounded.degeneracy > 10
    assert default.degeneracy <= 1.5
    assert not default.converged  # the bound, not the tolerance, ended the polish
    assert unbounded.rel_error < default.rel_error < damped_only.rel_error
    bounded = cp_als(t, 2, max_degeneracy=1.2)  # the bound is what decides
    assert bounded.degeneracy <= 1.2 and bounded.rel_error >= default.rel_error


def test_degeneracy_ratio() -> None:
    """1 for orthogonal components (any weights), large for a cancelling pair, 0 for zero."""
    eye = torch.eye(4, dtype=torch.float64)
    orthogonal = CPResult(weights=torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64),
                          factors=[eye, eye, eye], rel_error=0.0, n_iter=0)
    assert orthogonal.degeneracy == pytest.approx(1.0, rel=1e-12)
    a, b = torch.randn(5, 1, generator=_gen(0), dtype=torch.float64), torch.randn(5, 1, generator=_gen(1),
                                                                                     dtype=torch.float64)
    eps = 1e-3
    pair = [torch.cat([a + eps * b, a], dim=1), torch.cat([a, a], dim=1), torch.cat([a, -a], dim=1)]
    pair = [f / f.norm(dim=0) for f in pair]
    res = CPResult(weights=torch.tensor([1.0, 1.0], dtype=torch.float64), factors=pair, rel_error=0.0, n_iter=0)
    dense = res.reconstruct()
    assert res.degeneracy == pytest.approx(float(res.weights.norm() / dense.norm()), rel=1e-6)
    assert res.degeneracy > 100
    assert cp_als(torch.zeros(4, 3, 3, 3), 2).degeneracy == 0.0


def test_default_is_deterministic_through_the_polish() -> None:
    w = _noisy_low_rank((24, 20, 3, 3), 8, 0.05, seed=1).float()
    a, b = cp_als(w, 8), cp_als(w, 8)
    assert a.n_iter == b.n_iter and a.rel_error == b.rel_error
    for fa, fb in zip(a.factors, b.factors, strict=True):
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 2])
def test_damping_keeps_lossy_fits_from_degenerating(seed: int) -> None:
    """Undamped ALS on a lossy rank-20 fit of a 16x16x3x3 kernel drifts into cancelling
    components (30-230x the kernel's norm); damping keeps them below 10x for about the
    same error."""
    w = torch.randn(16, 16, 3, 3, generator=_gen(seed), dtype=torch.float64)
    plain, damped = cp_als(w, 20, damping=0), cp_als(w, 20)
    assert _cancellation(plain) > 30
    assert _cancellation(damped) < 10
    assert damped.rel_error < plain.rel_error * 1.02


# --------------------------------------------------------------------------- (c) conv factors


def _cp_conv(
    x: torch.Tensor, parts: tuple[torch.Tensor, ...], stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    first, vertical, horizontal, last = parts
    rank = first.shape[0]
    y = F.conv2d(x, first)
    y = F.conv2d(y, vertical, stride=(stride[0], 1), padding=(padding[0], 0), groups=rank)
    y = F.conv2d(y, horizontal, stride=(1, stride[1]), padding=(0, padding[1]), groups=rank)
    return F.conv2d(y, last)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"), [((3, 3), (1, 1), (1, 1)), ((3, 5), (2, 1), (1, 2)), ((1, 3), (1, 2), (0, 1))]
)
def test_conv_factors_chain_equals_cp_conv(
    kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> None:
    w = torch.randn(6, 4, *kernel, generator=_gen(1), dtype=torch.float64)
    x = torch.randn(2, 4, 9, 11, generator=_gen(2), dtype=torch.float64)
    rank = 5
    *parts, err = cp_conv_factors(w, rank)
    assert [tuple(p.shape) for p in parts] == [
        (rank, 4, 1, 1),
        (rank, 1, kernel[0], 1),
        (rank, 1, 1, kernel[1]),
        (6, rank, 1, 1),
    ]
    approx = cp_als(w, rank).reconstruct()
    assert err == pytest.approx(_rel(w, approx), rel=1e-9)
    expected = F.conv2d(x, approx, stride=stride, padding=padding)
    torch.testing.assert_close(_cp_conv(x, tuple(parts), stride, padding), expected, rtol=1e-9, atol=1e-9)


def test_conv_factors_exact_rank_reproduce_original_conv() -> None:
    w = _low_rank((8, 5, 3, 3), 4, seed=7)
    x = torch.randn(2, 5, 7, 7, generator=_gen(3), dtype=torch.float64)
    *parts, err = cp_conv_factors(w, 4, n_iter_max=400)
    assert err < 1e-6
    out = _cp_conv(x, tuple(parts), (1, 1), (1, 1))
    assert _rel(F.conv2d(x, w, padding=1), out) < 1e-6


def test_conv_factors_balance_component_norms_and_keep_dtype() -> None:
    w = torch.randn(12, 7, 3, 3, generator=_gen(5)) * 10
    first, vertical, horizontal, last, _ = cp_conv_factors(w, 6)
    assert all(p.dtype == torch.float32 for p in (first, vertical, horizontal, last))
    norms = torch.stack(
        [
            first.flatten(1).norm(dim=1),
            vertical.flatten(1).norm(dim=1),
            horizontal.flatten(1).norm(dim=1),
            last.flatten(1).norm(dim=0),
        ]
    )
    torch.testing.assert_close(norms, norms[:1].expand_as(norms), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- (d) validation


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one_is_rejected(rank: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        cp_als(torch.randn(4, 3, 3, 3), rank)
    with pytest.raises(ValueError, match="rank"):
        cp_conv_factors(torch.randn(4, 3, 3, 3), rank)


@pytest.mark.parametrize("rank", [2.0, True, "3"])
def test_non_int_rank_is_rejected(rank: object) -> None:
    with pytest.raises(ValueError, match="rank"):
        cp_als(torch.randn(4, 3, 3, 3), rank)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensor_raises_convfx_error(bad: float) -> None:
    w = torch.randn(4, 3, 3, 3)
    w[1, 2, 0, 1] = bad
    with pytest.raises(ConvfxError, match="NaN or Inf"):
        cp_als(w, 2)
    with pytest.raises(ConvfxError):
        cp_conv_factors(w, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"init": "hosvd"}, "init"), ({"n_iter_max": -1}, "n_iter_max"), ({"tol": -1.0}, "tol"),
     ({"damping": -0.1}, "damping"), ({"damping": 1.0}, "damping"), ({"damping": True}, "damping"),
     ({"max_degeneracy": -1.0}, "max_degeneracy"), ({"max_degeneracy": float("nan")}, "max_degeneracy"),
     ({"max_degeneracy": True}, "max_degeneracy"), ({"max_degeneracy": "2"}, "max_degeneracy")],
)
def test_bad_options_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cp_als(torch.randn(4, 3, 3, 3), 2, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("tensor", [torch.randn(5), torch.randn(0, 3), torch.tensor(1.0)])
def test_bad_tensor_shapes_are_rejected(tensor: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="tensor"):
        cp_als(tensor, 2)


def test_conv_factors_need_a_4d_kernel() -> None:
    with pytest.raises(ValueError, match="4-D"):
        cp_conv_factors(torch.randn(4, 3, 3), 2)
