"""Conv1d, Conv3d and ConvTranspose1d/2d/3d factorize like Conv2d.

Exact at full rank in float64 for every type, method and geometry; MACs equal the analytic
formula and fvcore's count; budgets, calibration, save/load, export and torch.compile.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convfx
from convfx.export import export
from passes.calibrate import patches, sampled_patches
from passes.convs import ConvGeometry, find_sites, module_kernel, oi_kernel
from passes.factors import (Factorized, FactorPlan, chain_kernel, conv_module, cp_factors, decompose_weights,
                            factor_cost, max_ranks, original_cost)
from passes.flops import fvcore_macs
from passes.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64

# name -> (layer factory, input shape). Every new type with stride, padding (ints, tuples,
# 'same'/'valid', padding modes), dilation, output padding, with and without bias.
GEOMS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 16)),
    "1d-stride-dilation-nobias": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, bias=False), (2, 4, 17)),
    "1d-same-reflect-even": (lambda: nn.Conv1d(5, 6, 4, padding="same", padding_mode="reflect"), (2, 5, 13)),
    "1d-circular": (lambda: nn.Conv1d(4, 5, 5, padding=2, padding_mode="circular"), (1, 4, 9)),
    "1d-valid-replicate": (lambda: nn.Conv1d(4, 6, 3, padding="valid", padding_mode="replicate"), (2, 4, 10)),
    "1d-pointwise-stride": (lambda: nn.Conv1d(6, 4, 1, stride=2), (2, 6, 9)),
    "3d": (lambda: nn.Conv3d(3, 5, 3, padding=1), (1, 3, 5, 6, 4)),
    "3d-mixed": (lambda: nn.Conv3d(3, 5, (3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 2), dilation=(1, 2, 1),
                                   bias=False), (2, 3, 7, 8, 9)),
    "3d-same-replicate": (lambda: nn.Conv3d(4, 3, (2, 3, 3), padding="same", padding_mode="replicate"),
                          (1, 4, 4, 5, 6)),
    "3d-circular": (lambda: nn.Conv3d(3, 4, 3, padding=1, padding_mode="circular"), (1, 3, 4, 5, 5)),
    "3d-reflect": (lambda: nn.Conv3d(3, 4, 3, padding=(1, 1, 0), padding_mode="reflect"), (1, 3, 4, 5, 5)),
    "3d-pointwise": (lambda: nn.Conv3d(5, 3, 1), (1, 5, 3, 4, 5)),
    "t1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 9)),
    "t1d-dilation-outpad": (lambda: nn.ConvTranspose1d(4, 6, 5, stride=3, padding=4, output_padding=2, dilation=2),
                            (2, 4, 9)),
    "t1d-crop-nobias": (lambda: nn.ConvTranspose1d(5, 4, 3, stride=2, padding=5, bias=False), (2, 5, 9)),
    "t2d": (lambda: nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1), (2, 6, 5, 6)),
    "t2d-mixed": (lambda: nn.ConvTranspose2d(5, 3, (3, 4), stride=(2, 3), padding=(1, 2), output_padding=(1, 0),
                                             dilation=(1, 2)), (2, 5, 6, 7)),
    "t2d-outpad-dilation": (lambda: nn.ConvTranspose2d(4, 5, 3, stride=1, padding=0, output_padding=1, dilation=2,
                                                       bias=False), (1, 4, 5, 5)),
    "t2d-pointwise-stride": (lambda: nn.ConvTranspose2d(5, 3, 1, stride=2, output_padding=1), (2, 5, 4, 5)),
    "t3d": (lambda: nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1), (1, 3, 3, 4, 5)),
    "t3d-mixed": (lambda: nn.ConvTranspose3d(4, 3, (2, 3, 1), stride=(1, 2, 3), padding=(0, 1, 0),
                                             output_padding=(0, 1, 2), dilation=(2, 1, 1), bias=False),
                  (1, 4, 3, 4, 3)),
}


class Wrap(nn.Module):
    """One layer and a non-trivial op after it (a bias-free mismatch cannot hide in a zero output)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.conv = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


def _case(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = GEOMS[name]
    torch.manual_seed(seed)
    model = Wrap(factory()).to(F64).eval()
    return model, torch.randn(shape, dtype=F64)


def _geom(model: nn.Module) -> ConvGeometry:
    return ConvGeometry.from_conv(model.conv)  # type: ignore[arg-type]


def _expected_macs(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> int:
    """fvcore's convention, written out: batch × kernel entries × output (transposed: input) positions."""
    y = conv(x)
    positions = math.prod(x.shape[2:]) if conv.transposed else math.prod(y.shape[2:])
    return x.shape[0] * conv.weight.numel() * positions


@pytest.mark.parametrize("method", ["tucker", "svd"])
@pytest.mark.parametrize("name", list(GEOMS))
def test_full_rank_is_exact_in_float64(name: str, method: str) -> None:
    model, x = _case(name)
    gm = convfx.compress(model, x, method=method, rank=1.0)
    (row,) = gm.convfx_report.layers
    assert row.skipped is None and row.method == ("svd" if _geom(model).is_pointwise else method), row
    assert isinstance(gm.get_submodule("conv"), Factorized)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-12)


def _low_rank_kernel(geom: ConvGeometry, r_out: int, r_in: int, gen: torch.Generator) -> torch.Tensor:
    """A kernel of exactly these Tucker ranks, in the layer's own layout."""
    k = geom.kernel_size
    core = torch.randn(r_out, r_in, *k, generator=gen, dtype=F64)
    w = torch.einsum("ab...,oa,ib->oi...", core, torch.randn(geom.out_channels, r_out, generator=gen, dtype=F64),
                     torch.randn(geom.in_channels, r_in, generator=gen, dtype=F64))
    return module_kernel(w, geom)


@pytest.mark.parametrize("fold", ["none", "in", "out"])
@pytest.mark.parametrize("name", ["1d", "3d-mixed", "t1d-dilation-outpad", "t2d-mixed", "t3d-mixed"])
def test_tucker_at_the_kernels_own_ranks_is_exact_in_every_fold_layout(name: str, fold: str) -> None:
    """Full input rank folds the first 1x1 into the (transposed) core, full output rank the last."""
    model, x = _case(name)
    g = _geom(model)
    r_out = g.out_channels if fold == "out" else g.out_channels - 1
    r_in = g.in_channels if fold == "in" else g.in_channels - 1
    with torch.no_grad():
        model.conv.weight.copy_(_low_rank_kernel(g, r_out, r_in, torch.Generator().manual_seed(1)))
    gm = convfx.compress(model, x, method="tucker", rank={"conv": (r_out, r_in)})
    container = gm.get_submodule("conv")
    assert container.n_factors == (3 if fold == "none" else 2)
    transposed = [isinstance(m, nn.modules.conv._ConvTransposeNd) for m in container.children()]
    assert sum(transposed) == g.transposed  # only the core is transposed
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["1d-stride-dilation-nobias", "1d-same-reflect-even", "3d-mixed", "3d-circular",
                                  "t1d-dilation-outpad", "t2d-mixed", "t3d-mixed"])
def test_cp_layers_compute_the_cp_kernel(name: str) -> None:
    """Pointwise → one depthwise conv per axis (each with its axis's geometry) → pointwise equals
    the original layer with the reconstructed kernel, whatever the fit error."""
    model, x = _case(name)
    g = _geom(model)
    gm = convfx.compress(model, x, method="cp", rank=5)
    container = gm.get_submodule("conv")
    assert container.n_factors == 2 + g.spatial
    ws, _ = decompose_weights(model.conv.weight, model.conv.bias, g, FactorPlan("cp", (5,)))
    ref = Wrap(conv_module(g, dtype=F64)).eval()
    with torch.no_grad():
        ref.conv.weight.copy_(module_kernel(chain_kernel("cp", ws), g))
        if model.conv.bias is not None:
            ref.conv.bias.copy_(model.conv.bias)
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["1d", "3d", "t1d", "t2d", "t3d-mixed"])
def test_cp_of_an_exact_cp_kernel_is_exact(name: str) -> None:
    model, x = _case(name)
    g = _geom(model)
    gen = torch.Generator().manual_seed(2)
    r = 3
    parts = [torch.randn(n, r, generator=gen, dtype=F64) for n in (g.out_channels, g.in_channels, *g.kernel_size)]
    letters = "abcde"[: g.spatial]
    w = torch.einsum(",".join(f"{c}r" for c in "oi" + letters) + "->oi" + letters, *parts)
    with torch.no_grad():
        model.conv.weight.copy_(module_kernel(w, g))
    gm = convfx.compress(model, x, method="cp", rank=r)
    (row,) = gm.convfx_report.layers
    assert row.rel_error is not None and row.rel_error < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_nd_cp_chain_is_cp_conv_factors_for_2d_kernels() -> None:
    from passes.cp import cp_conv_factors

    w = torch.randn(6, 5, 3, 3, dtype=F64)
    chain, err = cp_factors(w, 7)
    *ref, ref_err = cp_conv_factors(w, 7)
    assert err == ref_err and all(torch.equal(a, b) for a, b in zip(chain, ref, strict=True))


@pytest.mark.parametrize("name,method,ranks", [
    (name, method, ranks) for name in GEOMS for method, ranks in [("tucker", (3, 2)), ("svd", (3,)), ("cp", (4,))]
    if method == "svd" or "pointwise" not in name])  # pointwise convs always use svd
def test_macs_match_the_formula_and_fvcore_before_and_after(name: str, method: str, ranks: tuple[int, ...]) -> None:
    model, x = _case(name)
    g = _geom(model)
    ranks = tuple(min(r, lim) for r, lim in zip(ranks, max_ranks(g, method)))
    rank = ranks if method == "tucker" else ranks[0]
    gm = convfx.compress(model, x, method=method, rank={"conv": rank})
    (row,) = gm.convfx_report.layers
    before = _expected_macs(model.conv, x)
    assert row.macs_before == before == fvcore_macs(model, (x,))[0] == original_cost(g, tuple(x.shape))[0]
    after = fvcore_macs(gm, (x,))[0]
    assert row.macs_after == after == convfx.analyze(gm, x).conv_macs
    assert row.macs_after == factor_cost(g, FactorPlan(method, ranks), tuple(x.shape))[0]
    assert gm.convfx_report.conv_macs_after == after and gm.convfx_report.conv_macs_before == before
    assert row.params_after == sum(p.numel() for p in gm.get_submodule("conv").parameters())
    assert row.kernel == g.kernel_size and row.stride == g.stride and len(row.kernel) == g.spatial


@pytest.mark.parametrize("name", list(GEOMS))
def test_patches_are_the_rows_the_layer_multiplies(name: str) -> None:
    """im2col for 1-d/3-d inputs and transposed convs: patches @ W = the layer's output."""
    model, x = _case(name)
    conv, g = model.conv, _geom(model)
    p = patches(x, g)
    w = oi_kernel(conv.weight, g).reshape(g.out_channels, -1)
    bias = conv.bias if conv.bias is not None else torch.zeros(g.out_channels, dtype=F64)
    with torch.no_grad():
        want = conv(x).movedim(1, -1).reshape(-1, g.out_channels)
        torch.testing.assert_close(p @ w.T + bias, want, rtol=1e-12, atol=1e-12)
    idx = torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(0))[:9].sort().values
    assert torch.equal(sampled_patches(x, g, idx), p[idx])


def test_kernel_layouts_swap_channel_modes_group_by_group() -> None:
    conv = nn.ConvTranspose1d(4, 6, 3, groups=2)  # weight (C_in=4, C_out/g=3, k)
    g = ConvGeometry.from_conv(conv)
    w = oi_kernel(conv.weight, g)
    assert w.shape == (6, 2, 3) and torch.equal(module_kernel(w, g), conv.weight)
    # output channel 4 is the second group's (input channels 2, 3) second output
    assert torch.equal(w[4], conv.weight[2:4, 1])


@pytest.mark.parametrize("method,ranks", [("tucker", (3, 5)), ("svd", (3,)), ("cp", (15,))])
def test_full_rank_probe_kernels_keep_the_transposed_layout(method: str, ranks: tuple[int, ...]) -> None:
    """The truncations swapped into a layer to measure its sensitivity are in the layer's own layout."""
    from passes.allocate import predicted_kernel

    conv = nn.ConvTranspose2d(5, 3, 3).to(F64)
    g = ConvGeometry.from_conv(conv)
    c_in = torch.eye(5, dtype=F64) + 0.1
    c_out = oi_kernel(conv.weight, g).reshape(3, -1) @ oi_kernel(conv.weight, g).reshape(3, -1).T
    got = predicted_kernel(conv.weight, FactorPlan(method, ranks), c_in, c_out, geom=g)
    torch.testing.assert_close(got, conv.weight.detach(), rtol=1e-9, atol=1e-9)


# -- budgets ----------------------------------------------------------------------------------

def audio_net() -> nn.Module:
    """A small 1-d conv net over a 2-channel waveform (strided front end, dilated body, 1x1 head)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 16, 9, stride=2, padding=4), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 32, 3, padding=2, dilation=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 48, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
        nn.Conv1d(48, 10, 1), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
    ).eval()


def decoder() -> nn.Module:
    """A small transposed-conv decoder (2x upsampling per stage, output padding, 1x1 to RGB)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 24, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.ConvTranspose2d(24, 16, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(16, 3, 1),
    ).eval()


def volume_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(3, 12, 3, padding=1), nn.BatchNorm3d(12), nn.ReLU(),
        nn.Conv3d(12, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv3d(16, 8, 3, padding=1),
    ).eval()


def upsampler_1d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.ConvTranspose1d(8, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.ConvTranspose1d(16, 12, 5, stride=3, padding=2, output_padding=1, dilation=2)).eval()


def upsampler_3d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.ConvTranspose3d(6, 12, 2, stride=2), nn.ReLU(),
                         nn.ConvTranspose3d(12, 8, 3, stride=2, padding=1, output_padding=1)).eval()


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "audio-1d": (audio_net, (2, 2, 256)),
    "decoder-t2d": (decoder, (2, 32, 4, 4)),
    "volume-3d": (volume_net, (2, 3, 10, 10, 10)),
    "upsampler-t1d": (upsampler_1d, (4, 8, 32)),
    "upsampler-t3d": (upsampler_3d, (2, 6, 3, 3, 3)),
}


def _correlated(shape: tuple[int, ...], n: int, seed: int) -> list[torch.Tensor]:
    """Batches whose channels come from two latent signals plus a little noise: a low-dimensional
    input subspace, which a data-aware fit can exploit and a weight-space fit cannot see."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    mix = torch.randn(c, 2, generator=torch.Generator().manual_seed(99))
    out = []
    for _ in range(n):
        latent = torch.randn(shape[0], 2, *shape[2:], generator=gen)
        x = torch.einsum("cl,nl...->nc...", mix, latent) + 0.05 * torch.randn(shape, generator=gen)
        out.append(x)
    return out


def _warm_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Non-trivial BN statistics from the data."""
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    model.eval()


@pytest.mark.parametrize("method", ["tucker", "auto"])
@pytest.mark.parametrize("net", ["audio-1d", "decoder-t2d"])
def test_flops_target_lands_within_budget(net: str, method: str) -> None:
    build, shape = NETS[net]
    model = build()
    x = torch.randn(shape)
    calibration = _correlated(shape, 2, seed=3) if method == "auto" else None
    gm = convfx.compress(model, x, method=method, flops_target=0.5, calibration=calibration)
    rep = gm.convfx_report
    budget = 0.5 * rep.conv_macs_before
    assert rep.conv_macs_after <= budget and fvcore_macs(gm, (x,))[0] == rep.conv_macs_after
    assert rep.conv_macs_after >= 0.4 * rep.conv_macs_before  # lands near the target, not far below
    assert rep.factorized and all(r.macs_after < r.macs_before for r in rep.factorized)
    assert gm(x).shape == model(x).shape


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("method", ["tucker", "svd", "cp"])
def test_calibrated_fits_beat_weight_fits_on_held_out_inputs(net: str, method: str) -> None:
    build, shape = NETS[net]
    model = build()
    calib = _correlated(shape, 4, seed=1)
    held = _correlated(shape, 2, seed=2)
    _warm_bn(model, calib)
    rank = 3 if method == "cp" else 0.3
    weights = convfx.compress(model, calib[0], method=method, rank=rank)
    data = convfx.compress(model, calib[0], method=method, rank=rank, calibration=calib)
    assert all(r.fit == "data" for r in data.convfx_report.factorized)

    def err(gm: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((gm(x) - model(x)).norm() / model(x).norm()) for x in held) / len(held)

    assert err(data) < err(weights), (err(data), err(weights))


# -- reports, persistence, deployment --------------------------------------------------------

class Mixed(nn.Module):
    """Every new type in one model, plus layers that stay as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.t1 = nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1)
        self.g1 = nn.Conv1d(6, 6, 3, padding=1, groups=2)  # grouped: skipped
        self.c3 = nn.Conv3d(2, 6, 3, padding=1, padding_mode="circular")
        self.t3 = nn.ConvTranspose3d(6, 4, 2, stride=2, output_padding=0)
        self.dw = nn.ConvTranspose2d(4, 4, 3, groups=4)  # depthwise: skipped
        self.up = nn.ConvTranspose2d(4, 5, 3, stride=2, padding=1)  # called with output_size: skipped
        self.t2 = nn.ConvTranspose2d(4, 5, 3, stride=2, padding=1, output_padding=1)

    def forward(self, seq: torch.Tensor, vol: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        a = self.g1(torch.relu(self.t1(torch.relu(self.c1(seq)))))
        b = self.t3(torch.relu(self.c3(vol)))
        d = self.dw(img)
        c = self.up(d, output_size=[2 * d.shape[2], 2 * d.shape[3]]) + self.t2(d)
        return a.mean() + b.mean(dim=(1, 2, 3, 4)).sum() + c.sum()


def _mixed_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, 4, 12, generator=g, dtype=F64), torch.randn(2, 2, 4, 5, 3, generator=g, dtype=F64),
            torch.randn(2, 4, 7, 6, generator=g, dtype=F64))


def test_skipped_layers_are_reported_with_their_reason() -> None:
    torch.manual_seed(0)
    model = Mixed().to(F64).eval()
    xs = _mixed_inputs()
    gm = convfx.compress(model, xs, rank=1.0)
    rows = {r.fqn: r for r in gm.convfx_report.layers}
    assert {f for f, r in rows.items() if r.skipped is None} == {"c1", "t1", "c3", "t3", "t2"}
    assert "grouped" in str(rows["g1"].skipped) and "depthwise" in str(rows["dw"].skipped)
    assert "output_size" in str(rows["up"].skipped)
    table = gm.convfx_report.to_table()
    assert "output_size" in table and "6x4x2x2x2" in table  # the transposed 3-d weight (C_in, C_out, k...)'s shape
    with torch.no_grad():
        torch.testing.assert_close(gm(*xs), model(*xs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, method: str) -> None:
    torch.manual_seed(0)
    model = Mixed().to(F64).eval()
    xs = _mixed_inputs()
    gm = convfx.compress(model, xs, method=method, rank=0.5 if method == "tucker" else 3)
    path = convfx.save(gm, tmp_path / "m.pt")
    spec = convfx.serialize.read_spec(path)
    assert spec["layers"]["t2"]["geometry"]["transposed"] is True
    assert spec["layers"]["t2"]["geometry"]["output_padding"] == [1, 1]
    assert "transposed" not in spec["layers"]["c1"]["geometry"]
    loaded = convfx.load(path, model=Mixed())
    with torch.no_grad():
        assert torch.equal(loaded(*xs), gm(*xs))
    assert loaded.convfx_report.to_dict() == gm.convfx_report.to_dict()


def test_conv2d_geometry_dicts_are_unchanged_and_old_dicts_load() -> None:
    g = ConvGeometry.from_conv(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    d = g.to_dict()
    assert d == {"in_channels": 3, "out_channels": 4, "kernel_size": [3, 3], "stride": [2, 2], "padding": [1, 1],
                 "dilation": [1, 1], "groups": 1, "padding_mode": "zeros", "bias": True, "linear": False}
    assert ConvGeometry.from_dict(d) == g
    t = ConvGeometry.from_conv(nn.ConvTranspose3d(3, 4, 3, stride=2, output_padding=(1, 0, 1)))
    assert ConvGeometry.from_dict(t.to_dict()) == t and t.output_padding == (1, 0, 1) and t.spatial == 3


def test_inplace_puts_the_factors_into_the_callers_model() -> None:
    torch.manual_seed(0)
    model = Mixed().to(F64).eval()
    xs = _mixed_inputs()
    with torch.no_grad():
        want = model(*xs)
    gm = convfx.compress(model, xs, rank=1.0, inplace=True)
    assert all(isinstance(getattr(model, n), Factorized) for n in ("c1", "t1", "c3", "t3", "t2"))
    with torch.no_grad():
        torch.testing.assert_close(model(*xs), want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gm(*xs), want, rtol=1e-10, atol=1e-10)


def test_export_and_compile_run_the_factorized_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    xs = tuple(x.float() for x in _mixed_inputs())
    gm = convfx.compress(model, xs, rank=0.5)
    with torch.no_grad():
        want = gm(*xs)
        path = export(gm, xs, tmp_path / "m.pt2")
        torch.testing.assert_close(torch.export.load(path).module()(*xs), want, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        got = torch.compile(gm, backend="aot_eager", fullgraph=True)(*xs)
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class HandTransposed(nn.Module):
    """A transposed 1-d conv written by hand on the module's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 3, 3))  # (C_in, C_out, k)
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight, self.bias, 2, 1, 1)


class PaddedConv3d(nn.Conv3d):
    """A Conv3d subclass with its own forward (traced into: a functional conv3d on its weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(F.pad(x, (1, 0, 1, 0, 1, 0)), self.weight, self.bias, self.stride)


def test_functional_convs_of_every_type_are_sites() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = HandTransposed()
            self.c = PaddedConv3d(3, 4, 2, stride=2)

        def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.t(x).sum() + self.c(v).sum(dim=(1, 2, 3, 4))

    torch.manual_seed(0)
    model = Functional().to(F64).eval()
    xs = (torch.randn(2, 5, 7, dtype=F64), torch.randn(2, 3, 5, 5, 5, dtype=F64))
    sites, skipped = find_sites(trace(model).gm)
    geoms = {s.fqn: (s.kind, s.geometry) for s in sites}
    assert not skipped
    assert geoms["t"] == ("function", ConvGeometry(5, 3, (3,), (2,), (1,), (1,), bias=True, transposed=True,
                                                   output_padding=(1,)))
    assert geoms["c"] == ("function", ConvGeometry(3, 4, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), bias=True))
    gm = convfx.compress(model, xs, rank=1.0)
    assert {r.fqn for r in gm.convfx_report.factorized} == {"t", "c"}
    with torch.no_grad():
        torch.testing.assert_close(gm(*xs), model(*xs), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_inductor_compiles_the_factorized_layers() -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    xs = tuple(x.float() for x in _mixed_inputs())
    gm = convfx.compress(model, xs, rank=0.5)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(gm, backend="inductor", fullgraph=True)(*xs)
        torch.testing.assert_close(got, gm(*xs), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
