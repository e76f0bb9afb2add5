"""Property-based fuzzing of single conv layers: exact at full rank, or skipped with a reason."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import convfx
from passes.factors import Factorized

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


def _check(conv: nn.Conv2d, x: torch.Tensor, method: str) -> None:
    model = Wrap(conv).eval()
    gm = convfx.compress(model, x, method=method, rank=1.0)
    (row,) = gm.convfx_report.layers
    if conv.groups > 1:
        assert row.skipped and ("grouped" in row.skipped or "depthwise" in row.skipped), row
        assert isinstance(gm.get_submodule("conv"), nn.Conv2d)
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
