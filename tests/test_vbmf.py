"""Tests for passes.vbmf: EVBMF rank recovery, noise estimate, invariances, validation."""

from __future__ import annotations

import math

import pytest
import torch

from passes.errors import ConvfxError
from passes.vbmf import EVBMFResult, _minimize_log_bounded, _tau_bar, evbmf, evbmf_rank


# The matrices are small: extra threads only add synchronisation (and contention).
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank_plus_noise(
    rows: int, cols: int, rank: int, *, snr: float = 4.0, sigma: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """Rank-``rank`` signal whose singular values sit at ``snr``..``2 snr`` times the
    noise edge ``sigma (sqrt(rows) + sqrt(cols))``, plus i.i.d. N(0, sigma^2) noise."""
    g = _gen(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64))[0]
    edge = sigma * (math.sqrt(rows) + math.sqrt(cols))
    s = torch.linspace(snr, 2 * snr, rank, dtype=torch.float64) * edge
    return (u * s) @ v.T + sigma * torch.randn(rows, cols, generator=g, dtype=torch.float64)


SHAPES = [(64, 128), (128, 64), (100, 100), (30, 300), (300, 30), (64, 576), (576, 64)]


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_recovers_true_rank(rows: int, cols: int, rank: int) -> None:
    m = _low_rank_plus_noise(rows, cols, rank, seed=rows + cols + rank)
    res = evbmf(m)
    assert isinstance(res, EVBMFResult)
    assert res.rank == rank
    assert evbmf_rank(m) == rank


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_estimates_noise_variance(rows: int, cols: int) -> None:
    sigma = 0.3
    res = evbmf(_low_rank_plus_noise(rows, cols, 6, sigma=sigma, seed=1))
    assert res.sigma2 == pytest.approx(sigma**2, rel=0.1)


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_pure_noise_gives_one(rows: int, cols: int) -> None:
    noise = torch.randn(rows, cols, generator=_gen(rows * cols))
    assert evbmf(noise).rank == 0
    assert evbmf_rank(noise) == 1


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 0.5, 7.0, 1e4, 1e8])
def test_scale_invariance(scale: float) -> None:
    m = _low_rank_plus_noise(80, 150, 7, snr=2.0, seed=3)
    base = evbmf(m)
    scaled = evbmf(m * scale)
    assert scaled.rank == base.rank
    # the free energy is flat at its minimum: the minimiser is resolved to ~sqrt(eps)
    assert scaled.sigma2 == pytest.approx(base.sigma2 * scale**2, rel=1e-6)
    assert scaled.threshold == pytest.approx(base.threshold * scale, rel=1e-6)


@pytest.mark.parametrize(("rows", "cols"), [(40, 90), (90, 40), (50, 50)])
def test_transpose_gives_same_answer(rows: int, cols: int) -> None:
    m = _low_rank_plus_noise(rows, cols, 4, snr=1.5, seed=5)
    a, b = evbmf(m), evbmf(m.T)
    assert a.rank == b.rank
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-6)
    assert a.singular_values.shape == (min(rows, cols),)


def test_threshold_separates_kept_values() -> None:
    m = _low_rank_plus_noise(60, 200, 9, snr=1.2, seed=11)
    res = evbmf(m)
    s = res.singular_values
    assert bool((s[:-1] >= s[1:]).all())
    assert int((s > res.threshold).sum()) == res.rank


@pytest.mark.parametrize(
    "matrix",
    [
        torch.zeros(6, 9),
        torch.ones(1, 10),
        torch.ones(10, 1),
        torch.ones(1, 1),
        torch.outer(torch.arange(1.0, 8.0), torch.arange(1.0, 5.0)),  # exactly rank 1, no noise
        torch.randn(3, 500, generator=_gen(0)),
        torch.randn(2, 2, generator=_gen(1)),
    ],
)
def test_rank_is_always_at_least_one(matrix: torch.Tensor) -> None:
    res = evbmf(matrix)
    assert res.rank >= 0 and math.isfinite(res.sigma2) and math.isfinite(res.threshold)
    assert evbmf_rank(matrix) >= 1


def test_exact_low_rank_without_noise() -> None:
    g = _gen(2)
    m = torch.randn(30, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 70, generator=g, dtype=torch.float64)
    assert evbmf(m).rank == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
def test_dtypes(dtype: torch.dtype) -> None:
    m = _low_rank_plus_noise(20, 40, 3, seed=4)
    m = m.round() if not dtype.is_floating_point else m
    res = evbmf(m.to(dtype))
    assert res.rank == 3
    expected = dtype if dtype.is_floating_point else torch.get_default_dtype()
    assert res.singular_values.dtype == expected


def test_conv_kernel_unfoldings() -> None:
    """The intended use: Tucker-2 ranks from the two channel unfoldings of a kernel."""
    g = _gen(8)
    core = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64) * 10
    u = torch.linalg.qr(torch.randn(32, 6, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(24, 5, generator=g, dtype=torch.float64))[0]
    w = torch.einsum("abhw,ia,jb->ijhw", core, u, v) + 0.01 * torch.randn(32, 24, 3, 3, generator=g)
    assert evbmf_rank(w.reshape(32, -1)) == 6
    assert evbmf_rank(w.transpose(0, 1).reshape(24, -1)) == 5


# --------------------------------------------------------------------------- internals


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1, 0.01, 1e-4])
def test_tau_bar_is_the_root_and_close_to_the_published_fit(alpha: float) -> None:
    tau = _tau_bar(alpha)
    assert abs(math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau) < 1e-12
    assert tau > math.sqrt(alpha)  # the threshold lies above the Marchenko-Pastur edge
    if alpha >= 0.1:  # Nakajima et al.'s fit tau_bar ~ 2.5129 sqrt(alpha); it drifts for tiny alpha
        assert tau == pytest.approx(2.5129 * math.sqrt(alpha), rel=0.05)
    if alpha == 1.0:
        assert tau == pytest.approx(2.5129, abs=1e-3)


@pytest.mark.parametrize("centre", [-3.0, 0.2, 1.9])
def test_bounded_minimizer_finds_global_minimum(centre: float) -> None:
    # two wells; the deeper one at ``centre``, a shallow decoy at the far end
    def fn(u: torch.Tensor) -> torch.Tensor:
        return torch.minimum((u - centre) ** 2, 0.5 + 0.1 * (u + 4.0) ** 2)

    found = _minimize_log_bounded(fn, -4.0, 2.0, torch.device("cpu"))
    assert math.log(float(found)) == pytest.approx(centre, abs=1e-8)


def test_bounded_minimizer_degenerate_interval() -> None:
    found = _minimize_log_bounded(lambda u: u * 0, 0.5, 0.5, torch.device("cpu"))
    assert float(found) == pytest.approx(math.exp(0.5))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises_convfx_error(bad: float) -> None:
    m = torch.randn(5, 7)
    m[2, 3] = bad
    with pytest.raises(ConvfxError, match="NaN or Inf"):
        evbmf(m)
    with pytest.raises(ConvfxError):
        evbmf_rank(m)


@pytest.mark.parametrize("matrix", [torch.randn(5), torch.randn(2, 3, 4), torch.randn(0, 4), torch.tensor(3.0)])
def test_non_matrix_is_rejected(matrix: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="2-D"):
        evbmf(matrix)


def test_non_tensor_is_rejected() -> None:
    with pytest.raises(ValueError, match="torch.Tensor"):
        evbmf([[1.0, 2.0]])  # type: ignore[arg-type]
