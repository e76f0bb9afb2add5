"""Fast slice of benchmarks/coverage.py: whole zoo models compress exactly at full rank.

Each model (random init, eval mode, float64, small input) must come back from
``convfx.compress(..., rank=1.0)`` with every Conv2d either factorized or reported as skipped,
and with the same output as the eager model. The full sweep (every torchvision builder and a
timm list) is ``python benchmarks/coverage.py``; see benchmarks/results/coverage*.md.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import convfx

F64 = torch.float64


def _redraw_zero_weights(model: nn.Module) -> None:
    # A weight initialised to exactly zero (ViT heads, zero-init last BN) would hide a mismatch.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.numel() and not name.endswith("bias") and not bool(p.abs().max() > 0):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) if p.dim() >= 2
                        else torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)


def _check_full_rank(model: nn.Module, size: int) -> None:
    torch.manual_seed(0)
    _redraw_zero_weights(model)
    model = model.to(F64).eval()
    x = torch.randn(2, 3, size, size, dtype=F64)
    gm = convfx.compress(model, x, method="tucker", rank=1.0, progress=False)
    rep = gm.convfx_report
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(rep.factorized) > 0
    assert len(rep.factorized) + len(rep.skipped) == n_convs, rep
    assert all(r.skipped for r in rep.skipped)  # every skipped conv says why
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert ref.abs().max() > 0
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))


@pytest.mark.parametrize("arch,size", [
    ("resnet18", 32),             # plain + residual
    ("mobilenet_v3_small", 32),   # depthwise (skipped), SE, hardswish
    ("squeezenet1_1", 48),        # fire modules, concat
    ("shufflenet_v2_x0_5", 32),   # channel shuffle, depthwise
])
def test_torchvision_builder_is_exact_at_full_rank(arch: str, size: int) -> None:
    torch.manual_seed(0)
    _check_full_rank(torchvision.models.get_model(arch, weights=None, num_classes=10), size)


@pytest.mark.parametrize("name", [
    "mobilenetv3_small_050",             # timm depthwise/SE blocks
    "tf_mobilenetv3_small_minimal_100",  # Conv2dSame: untraceable convs kept as leaves, reported skipped
])
def test_timm_model_is_exact_at_full_rank(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    _check_full_rank(timm.create_model(name, pretrained=False, num_classes=10), 32)
