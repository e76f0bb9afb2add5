"""Property-based fuzzing of single conv layers: exact at full rank, or skipped with a reason.

``conv_cases`` draws Conv2d layers; ``any_conv_cases`` draws every conv type (Conv1d/2d/3d,
ConvTranspose1d/2d/3d) with random geometry.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import convfx
from passes.convs import ConvGeometry, module_kernel
from passes.factors import Factorized, FactorPlan, chain_kernel, decompose_weights, max_ranks

F64 = torch.float64


class Wrap(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + 1.0


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[nn.Conv2d, torch.Tensor]:
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 4))
    cout = groups * draw(st.integers(1, 4))
    k = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if pad_kind == "same":
        stride = (1, 1)
        padding: object = "same"
    elif pad_kind == "valid":
        padding = "valid"
    elif pad_kind == "int":
        padding = draw(st.integers(0, 3))
    else:
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    h = draw(st.integers(1, 14))
    w = draw(st.integers(1, 14))
    n = draw(st.integers(1, 2))
    try:
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                         bias=bias, padding_mode=mode).to(F64)  # type: ignore[arg-type]
        x = torch.randn(n, cin, h, w, dtype=F64)
        with torch.no_grad():
            conv(x)
    except (RuntimeError, ValueError):
        assume(False)  # PyTorch itself rejects this configuration
    return conv, x


_CLASSES = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
            (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
_MAX_SIDE = {1: 12, 2: 8, 3: 5}  # input side per spatial rank, so that 3-d cases stay small


@st.composite
def any_conv_cases(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """A conv of any type (1-3 d, plain or transposed) with random geometry, and an input it takes."""
    n = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 1, 1, 2]))
    cin = groups * draw(st.integers(1, 4))
    cout = groups * draw(st.integers(1, 4))

    def axes(lo: int, hi: int) -> tuple[int, ...]:
        return tuple(draw(st.integers(lo, hi)) for _ in range(n))

    k = axes(1, 4 if n < 3 else 3)
    stride, dilation = axes(1, 3), axes(1, 3)
    kw: dict[str, object] = {"stride": stride, "dilation": dilation, "groups": groups, "bias": draw(st.booleans())}
    if transposed:
        kw["padding"] = draw(st.one_of(st.integers(0, 3), st.tuples(*[st.integers(0, 3)] * n)))
        kw["output_padding"] = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    else:
        pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
        if pad_kind == "same":
            kw["stride"] = 1
            kw["padding"] = "same"
        else:
            kw["padding"] = {"valid": "valid", "int": draw(st.integers(0, 3)),
                             "tuple": draw(st.tuples(*[st.integers(0, 3)] * n))}[pad_kind]
        kw["padding_mode"] = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    size = axes(1, _MAX_SIDE[n])
    batch = draw(st.integers(1, 2))
    try:
        conv = _CLASSES[(n, transposed)](cin, cout, k, **kw).to(F64)  # type: ignore[arg-type]
        x = torch.randn(batch, cin, *size, dtype=F64)
        with torch.no_grad():
            y = conv(x)
        assume(y.numel() > 0)
    except (RuntimeError, ValueError):
        assume(False)  # PyTorch itself rejects this configuration
    return conv, x


def _label(conv: nn.Module) -> str:
    """The example's kind, counted by ``--hypothesis-show-statistics``."""
    return type(conv).__name__ + (" (grouped: skipped)" if conv.groups > 1 else "")  # type: ignore[operator]


def _check(conv: nn.Module, x: torch.Tensor, method: str) -> None:
    event(_label(conv))
    model = Wrap(conv).eval()
    gm = convfx.compress(model, x, method=method, rank=1.0)
    (row,) = gm.convfx_report.layers
    if conv.groups > 1:  # type: ignore[operator]
        assert row.skipped and ("grouped" in row.skipped or "depthwise" in row.skipped), row
        assert gm.get_submodule("conv") is not None and not isinstance(gm.get_submodule("conv"), Factorized)
    else:
        assert row.skipped is None, row
        assert isinstance(gm.get_submodule("conv"), Factorized)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", ["tucker", "svd"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(case=conv_cases())
def test_fuzz_full_rank_exact_or_skipped(case: tuple[nn.Conv2d, torch.Tensor], method: str) -> None:
    _check(*case, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tucker", "svd"])
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(case=conv_cases())
def test_fuzz_full_rank_exact_or_skipped_many(case: tuple[nn.Conv2d, torch.Tensor], method: str) -> None:
    _check(*case, method)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(case=conv_cases())
def test_fuzz_cp_structure_runs_and_fits(case: tuple[nn.Conv2d, torch.Tensor]) -> None:
    """CP at a generous rank gets a small kernel error and keeps the conv's output shape."""
    conv, x = case
    assume(conv.groups == 1)
    kh, kw = conv.kernel_size
    rank = max(1, min(conv.in_channels * kh * kw, conv.out_channels * kh * kw,
                      conv.in_channels * conv.out_channels * min(kh, kw)))
    model = Wrap(conv).eval()
    gm = convfx.compress(model, x, method="cp", rank=rank)
    (row,) = gm.convfx_report.layers
    assert row.skipped is None
    assert row.rel_error is not None and row.rel_error < 1e-2, row
    assert gm(x).shape == model(x).shape


@pytest.mark.parametrize("method", ["tucker", "svd"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(case=any_conv_cases())
def test_fuzz_every_conv_type_full_rank_exact_or_skipped(case: tuple[nn.Module, torch.Tensor], method: str) -> None:
    _check(*case, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tucker", "svd"])
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(case=any_conv_cases())
def test_fuzz_every_conv_type_full_rank_exact_or_skipped_many(case: tuple[nn.Module, torch.Tensor],
                                                               method: str) -> None:
    _check(*case, method)


def _check_cp_structure(conv: nn.Module, x: torch.Tensor) -> None:
    """The cp layers (1x1 → one depthwise conv per axis, each with its axis's stride, padding,
    dilation and output padding → 1x1) equal the layer with the reconstructed kernel."""
    assume(conv.groups == 1)  # type: ignore[operator]
    event(_label(conv))
    g = ConvGeometry.from_conv(conv)  # type: ignore[arg-type]
    plan = FactorPlan("svd" if g.is_pointwise else "cp", (3,))  # pointwise convs always use svd
    plan = FactorPlan(plan.method, (min(3, max_ranks(g, plan.method)[0]),))
    model = Wrap(conv).eval()
    gm = convfx.compress(model, x, method="cp", rank={"conv": plan.ranks[0]})
    (row,) = gm.convfx_report.layers
    assert row.skipped is None and (row.method, row.ranks) == (plan.method, plan.ranks), row
    ws, _ = decompose_weights(conv.weight, conv.bias, g, plan)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.conv.weight.copy_(module_kernel(chain_kernel(plan.method, ws), g))
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-8, atol=1e-8)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(case=any_conv_cases())
def test_fuzz_cp_layers_compute_their_kernel(case: tuple[nn.Module, torch.Tensor]) -> None:
    _check_cp_structure(*case)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(case=any_conv_cases())
def test_fuzz_cp_layers_compute_their_kernel_many(case: tuple[nn.Module, torch.Tensor]) -> None:
    _check_cp_structure(*case)
