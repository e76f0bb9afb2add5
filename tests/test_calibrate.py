"""Data-aware fitting and FLOP-budgeted allocation."""
from __future__ import annotations

import re

import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import convfx
from convfx.zoo import cifar_resnet
from passes.allocate import Candidate, allocate, layer_candidates, predicted_kernel
from passes.calibrate import (MomentStats, SuffixWalk, fit_factors, noise_sensitivity, output_discrepancy,
                              output_error, probe_sensitivity)
from passes.convs import ConvGeometry, find_sites
from passes.factors import FactorPlan
from passes.trace import trace

F64 = torch.float64


def _correlated_images(n: int, c: int, hw: int, rank: int, seed: int) -> torch.Tensor:
    """Images whose channels live near a low-dimensional subspace, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, rank, generator=g)
    base = torch.randn(n, rank, hw, hw, generator=g)
    x = torch.einsum("cr,nrhw->nchw", mix, base) + 0.05 * torch.randn(n, c, hw, hw, generator=g)
    return x


def _two_convs(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1)).eval()


def _rel_out_err(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).norm() / ya.norm())


@pytest.mark.parametrize("method,rank,margin", [("tucker", (6, 4), 0.8), ("svd", 5, 0.8), ("cp", 8, 0.95)])
def test_data_aware_beats_data_free_at_equal_ranks(method: str, rank: object, margin: float) -> None:
    model = _two_convs()
    calib = _correlated_images(64, 16, 8, rank=4, seed=1)
    held_out = _correlated_images(96, 16, 8, rank=4, seed=1)[64:]  # same distribution, unseen
    x = calib[:1]
    free = convfx.compress(model, x, method=method, rank=rank)
    aware = convfx.compress(model, x, method=method, rank=rank, calibration=[calib[:32], calib[32:]])
    assert [r.ranks for r in free.convfx_report.factorized] == [r.ranks for r in aware.convfx_report.factorized]
    e_free, e_aware = _rel_out_err(model, free, held_out), _rel_out_err(model, aware, held_out)
    assert e_aware < margin * e_free, (e_aware, e_free)  # CP refits only its last factor
    assert all(r.fit == "data" and r.output_error is not None for r in aware.convfx_report.factorized)


@pytest.mark.parametrize("method", ["tucker", "svd"])
def test_calibrated_factors_are_well_scaled(method: str) -> None:
    """Whitening must not leave tiny and huge factors behind: SGD fine-tuning diverges on them."""
    model = _two_convs()
    calib = _correlated_images(64, 16, 8, rank=3, seed=4) * 10  # strongly anisotropic inputs
    gm = convfx.compress(model, calib[:1], method=method, rank=(6, 4) if method == "tucker" else 5,
                         calibration=[calib])
    for i in ("0", "2"):
        w = [gm.get_submodule(f"{i}.{j}").weight.detach() for j in range(3 if method == "tucker" else 2)]
        if method == "tucker":
            first, last = w[0].flatten(1), w[2].flatten(1)
            assert torch.allclose(first @ first.T, torch.eye(first.shape[0]), atol=1e-4)
            assert torch.allclose(last.T @ last, torch.eye(last.shape[1]), atol=1e-4)
        else:  # both factors carry the square roots of the product's singular values
            a, b = w[1].flatten(1), w[0].flatten(1)
            assert torch.allclose(a.norm(dim=0), b.norm(dim=1), rtol=1e-3)


def test_calibrated_full_rank_is_still_exact() -> None:
    model = _two_convs().to(F64)
    calib = _correlated_images(16, 16, 8, rank=16, seed=2).to(F64)
    gm = convfx.compress(model, calib[:1], rank=1.0, calibration=[calib])
    assert _rel_out_err(model, gm, calib) < 1e-5


def test_generator_and_dataloader_give_the_same_result() -> None:
    model = _two_convs()
    data = _correlated_images(40, 16, 8, rank=4, seed=3)
    labels = torch.zeros(40, dtype=torch.long)
    loader = DataLoader(TensorDataset(data, labels), batch_size=10, shuffle=False)
    gen = ((data[i:i + 10], labels[i:i + 10]) for i in range(0, 40, 10))
    a = convfx.compress(model, data[:1], rank=(6, 4), calibration=loader)
    b = convfx.compress(model, data[:1], rank=(6, 4), calibration=gen)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("name,target,method", [
    ("cifar_resnet20", 0.5, "tucker"), ("cifar_resnet20", 0.33, "tucker"), ("resnet18", 0.5, "tucker"),
    ("vgg_small", 0.5, "tucker"), ("vgg_small", 0.33, "tucker"), ("cifar_resnet20", 0.4, "cp"),
    ("vgg_small", 0.5, "svd"), ("cifar_resnet20", 0.4, "auto"),
    pytest.param("resnet18", 0.5, "auto", marks=pytest.mark.slow)])  # CP-ALS at ranks ~1000: minutes
def test_flops_target_lands_within_tolerance(name: str, target: float, method: str) -> None:
    torch.manual_seed(0)
    if name == "cifar_resnet20":
        model, x = cifar_resnet(20).eval(), torch.randn(1, 3, 32, 32)
    elif name == "resnet18":
        model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    else:
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 10, 1)).eval()
        x = torch.randn(1, 3, 32, 32)
    before = convfx.analyze(model, x).conv_macs
    gm = convfx.compress(model, x, method=method, flops_target=target, rank_multiple=1)
    after = convfx.analyze(gm, x).conv_macs
    assert after <= target * before
    assert after >= (target - 0.01) * before, (after / before)
    for row in gm.convfx_report.factorized:
        assert min(row.ranks) >= 1
        assert row.macs_after < row.macs_before, row.fqn  # a factorization that saves nothing is never picked


def test_flops_target_with_calibration_and_rank_multiple() -> None:
    model = cifar_resnet(20).eval()
    calib = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    x = torch.randn(1, 3, 32, 32)
    gm = convfx.compress(model, x, flops_target=0.5, calibration=calib, rank_multiple=4)
    before = convfx.analyze(model, x).conv_macs
    assert convfx.analyze(gm, x).conv_macs <= 0.5 * before
    for row in gm.convfx_report.factorized:
        full = (row.shape[0], row.shape[1]) if row.method == "tucker" else (min(row.shape[0], row.shape[1]),)
        assert all(r % 4 == 0 or r == f for r, f in zip(row.ranks, full)), row


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, "half", True])
def test_flops_target_validation(bad: object) -> None:
    with pytest.raises(ValueError, match="flops_target"):
        convfx.compress(_two_convs(), torch.randn(1, 16, 8, 8), flops_target=bad)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_calibration_shrink_validation(bad: object) -> None:
    with pytest.raises(ValueError, match="calibration_shrink"):
        convfx.compress(_two_convs(), torch.randn(1, 16, 8, 8), calibration_shrink=bad)


@pytest.mark.parametrize("method,rank,tol", [("tucker", (6, 4), 0.02), ("svd", 5, 1e-3)])
def test_calibration_shrink_moves_the_fit_between_data_and_weights(method: str, rank: object, tol: float) -> None:
    """0: the pure data fit (lowest error on the calibration images); very large: a weight-space
    fit (for SVD the data-free one; Tucker's alternating refit lands within a few percent)."""
    model = _two_convs()
    calib = _correlated_images(64, 16, 8, rank=4, seed=1)
    x = calib[:1]
    free = convfx.compress(model, x, method=method, rank=rank)
    fits = {rho: convfx.compress(model, x, method=method, rank=rank, calibration=[calib[:32], calib[32:]],
                                 calibration_shrink=rho) for rho in (0.0, 0.01, 1e9)}
    err = {rho: _rel_out_err(model, gm, calib) for rho, gm in fits.items()}
    assert err[0.0] <= err[0.01] < _rel_out_err(model, free, calib)
    assert err[1e9] == pytest.approx(_rel_out_err(model, free, calib), rel=tol)


def test_flops_target_unreachable_and_exclusive_with_rank() -> None:
    # a depthwise-heavy model cannot be cut by 100x
    model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 16, 1))
    with pytest.raises(ValueError, match="flops_target.*unreachable"):
        convfx.compress(model, torch.randn(1, 16, 8, 8), flops_target=0.01)
    with pytest.raises(ValueError, match="rank"):
        convfx.compress(_two_convs(), torch.randn(1, 16, 8, 8), flops_target=0.5, rank=0.5)


def test_allocation_prefers_cheap_error_and_respects_budget() -> None:
    flat = [Candidate(None, 100, 0.0), Candidate(None, 50, 0.01), Candidate(None, 10, 0.5)]
    steep = [Candidate(None, 100, 0.0), Candidate(None, 50, 0.4), Candidate(None, 10, 0.9)]
    chosen = allocate({"flat": flat, "steep": steep}, budget=150, fixed=0)
    assert chosen["flat"].macs == 50 and chosen["steep"].macs == 100
    with pytest.raises(ValueError, match="flops_target"):
        allocate({"flat": flat}, budget=5, fixed=0)


@pytest.mark.parametrize("bad", [torch.randn(2, 16, 8, 8), 3, [], [("x",)]])
def test_bad_calibration_inputs(bad: object) -> None:
    with pytest.raises(ValueError, match="calibration"):
        convfx.compress(_two_convs(), torch.randn(1, 16, 8, 8), rank=0.5, calibration=bad)


@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_calibration_survives_singular_input_covariance(method: str) -> None:
    """Dead, duplicated and huge channels (as in EfficientNet-Lite0) make the covariance singular."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 16, 1 if method == "svd" else 3, padding="same")).eval()
    calib = torch.randn(64, 12, 8, 8)
    calib[:, 0] = 0.0  # a dead channel
    calib[:, 1] = calib[:, 2] * 3.0  # exactly collinear channels
    calib[:, 3] *= 1e4  # a channel 4 orders of magnitude louder
    gm = convfx.compress(model, calib[:1], method=method, rank=6 if method == "svd" else (6, 6),
                         calibration=[calib[:32], calib[32:]])
    with torch.no_grad():
        out = gm(calib)
    assert torch.isfinite(out).all()
    assert _rel_out_err(model, gm, calib) < 1.0


class _LoudAndQuiet(nn.Module):
    """Two identical-shape convs whose outputs reach the model output with weights 1 and 0.01."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Conv2d(16, 16, 3, padding=1)
        self.quiet = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loud(x) + 0.01 * self.quiet(x)


def test_sensitivity_steers_the_allocation() -> None:
    """The layer whose errors barely reach the output gets the deeper cut."""
    torch.manual_seed(0)
    model = _LoudAndQuiet().eval()
    with torch.no_grad():
        model.quiet.weight.copy_(model.loud.weight)  # same spectra: only sensitivity differs
        model.quiet.bias.copy_(model.loud.bias)
    calib = _correlated_images(32, 16, 8, rank=16, seed=5)
    gm = convfx.compress(model, calib[:1], flops_target=0.6, calibration=[calib])
    ranks = {r.fqn: r.ranks for r in gm.convfx_report.factorized}
    loud = ranks.get("loud", (16, 16))  # absent: kept at full cost
    assert sum(ranks["quiet"]) < sum(loud), ranks


@pytest.mark.parametrize("rank", [1, 3, 5])  # candidates are only plans cheaper than the layer: r(12+10) < 120
def test_predicted_kernel_has_the_predicted_svd_error(rank: int) -> None:
    """The probe kernel's output error, computed from the covariance, is the allocation's prediction."""
    torch.manual_seed(rank)
    conv = nn.Conv2d(12, 10, 1).eval()
    mix = torch.randn(12, 12, dtype=F64)
    c_in = mix @ mix.T  # anisotropic input covariance
    site = find_sites(trace(nn.Sequential(conv)).gm)[0][0]
    cands = layer_candidates(site, "svd", (1, 12, 4, 4), c_in, None)
    pred = next(c.err2 for c in cands if c.plan == FactorPlan("svd", (rank,)))
    w = conv.weight.detach().to(F64).reshape(10, 12)
    w_hat = predicted_kernel(conv.weight, FactorPlan("svd", (rank,)), c_in, torch.eye(10, dtype=F64)).to(F64)
    w_hat = w_hat.reshape(10, 12)
    measured = float(torch.trace((w - w_hat) @ c_in @ (w - w_hat).T) / torch.trace(w @ c_in @ w.T))
    assert measured == pytest.approx(pred, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("method,plan", [("tucker", (16, 16)), ("svd", (16,)), ("cp", (16,))])
def test_predicted_kernel_is_exact_at_full_rank(method: str, plan: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    mix = torch.randn(16, 16, dtype=F64)
    ranks = plan if method != "svd" else (16 * 9,)
    w_hat = predicted_kernel(conv.weight, FactorPlan(method, ranks), mix @ mix.T, torch.eye(16, dtype=F64))
    torch.testing.assert_close(w_hat, conv.weight.detach(), rtol=1e-4, atol=1e-5)


def test_probe_sensitivity_ranks_layers_and_restores_weights() -> None:
    torch.manual_seed(0)
    model = _LoudAndQuiet().eval()
    gm = trace(model).gm
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    x = _correlated_images(8, 16, 8, rank=16, seed=6)
    probes = {name: [(0.04, torch.zeros_like(getattr(model, name).weight)), (0.25, 0.5 * getattr(model, name).weight)]
              for name in ("loud", "quiet")}
    sens = probe_sensitivity(gm, probes, (x,))
    assert sens["quiet"] < 1e-2 * sens["loud"], sens  # 0.01 output weight: 1e-4 of the harm
    for k, v in gm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


class _PaddedConv(nn.Conv2d):
    """EfficientNet-style "same" conv: traced as pad + F.conv2d on the module's weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride)


class _SharedConvNet(nn.Module):
    """A residual add, one conv module called twice and a functional conv: suffix runs must see them all."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.padded = _PaddedConv(8, 8, 2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.padded(h))
        return self.head(h.mean((2, 3)))


class _Override(torch.fx.Interpreter):
    """Ground truth for a suffix run: a full forward pass with one node's output transformed."""

    def __init__(self, gm: torch.fx.GraphModule, name: str, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__(gm)
        self.name, self.fn = name, fn

    def run_node(self, n: torch.fx.Node) -> object:
        out = super().run_node(n)
        return self.fn(out) if n.name == self.name else out


def test_suffix_walk_matches_full_forward_passes() -> None:
    torch.manual_seed(0)
    gm = trace(_SharedConvNet().eval()).gm
    x = torch.randn(4, 3, 12, 12)
    names = [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    walk = SuffixWalk(gm, (x,), names)
    assert len(walk) == len(names)
    seen = []
    with torch.no_grad():
        y0 = gm(x)
        for name, run_rest in walk:
            seen.append(name)
            torch.testing.assert_close(run_rest(), y0, rtol=0, atol=0)
            expected = _Override(gm, name, lambda t: t * 1.5 - 0.25).run(x)
            torch.testing.assert_close(run_rest(lambda t: t * 1.5 - 0.25), expected, rtol=0, atol=0)
    assert seen == names  # graph order, every chosen node once


def test_probe_and_noise_sensitivity_match_their_definitions_on_a_shared_layer() -> None:
    """Suffix-only runs give what full forward passes give, also for a layer called twice."""
    torch.manual_seed(0)
    gm = trace(_SharedConvNet().eval()).gm
    x = torch.randn(6, 3, 12, 12)
    w = gm.shared.weight.detach().clone()
    probes = {"shared": [(0.1, 0.8 * w), (0.3, w * (torch.rand_like(w) > 0.3))],
              "stem": [(0.2, 0.5 * gm.stem.weight.detach())], "padded": [(0.2, -gm.padded.weight.detach())]}
    node_to_site = {n.name: s.fqn for s in find_sites(gm)[0] for n in s.nodes}
    assert any(gm.graph.find_nodes(op="call_function", target=F.conv2d)) and "padded" in node_to_site.values()
    sens = probe_sensitivity(gm, probes, (x,), node_to_site)
    assert set(sens) == set(probes)
    with torch.no_grad():
        base = gm(x)
        for fqn, pts in probes.items():
            harm = []
            for e, k in pts:
                saved = gm.get_submodule(fqn).weight.detach().clone()
                gm.get_submodule(fqn).weight.copy_(k)
                harm.append((e, output_discrepancy(gm(x), base)))
                gm.get_submodule(fqn).weight.copy_(saved)
            slope = sum(e * h for e, h in harm) / sum(e * e for e, _ in harm)
            assert sens[fqn] == pytest.approx(slope, rel=1e-9), fqn
    noise = noise_sensitivity(gm, node_to_site, (x,), {})
    assert set(noise) == {"stem", "shared", "padded", "head"}
    g = torch.Generator()

    def noisy(t: torch.Tensor) -> torch.Tensor:
        g.manual_seed(0)
        return t + torch.randn(t.shape, generator=g) * 0.1 * t.pow(2).mean().sqrt()

    with torch.no_grad():
        for name, fqn in node_to_site.items():
            y = _Override(gm, name, noisy).run(x)
            expected = float((y - base).double().pow(2).sum() / base.double().pow(2).sum()) / 0.1**2
            if name == [n for n, f in node_to_site.items() if f == fqn][-1]:  # a shared layer keeps its last call
                assert noise[fqn] == pytest.approx(expected, rel=1e-4), name


def test_flops_target_keeps_the_allocation_closest_on_calibration_data() -> None:
    """With data, every candidate allocation is fitted; the kept one has the lowest discrepancy."""
    model = cifar_resnet(20, checkpoint=None).eval()
    calib = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = convfx.compress(model, calib[0][:1], flops_target=0.5, calibration=calib, progress=False)
    note = next(n for n in gm.convfx_report.notes if n.startswith("flops_target: allocations fitted"))
    scores = {label: float(v) for label, v in re.findall(r"(\w+) sensitivities \(calibration output discrepancy "
                                                        r"([0-9.e+-]+)\)", note)}
    kept = note.rsplit("kept ", 1)[1]
    assert len(scores) == 2 and scores[kept] == min(scores.values()), note
    with torch.no_grad():
        y0 = [model(x) for x in calib]
        y = [gm(x) for x in calib]
    measured = sum(output_discrepancy(a, b) for a, b in zip(y, y0)) / len(calib)
    assert measured == pytest.approx(scores[kept], rel=1e-3)
    assert gm.convfx_report.conv_macs_after <= 0.5 * gm.convfx_report.conv_macs_before


def test_flops_target_with_calibration_inplace_puts_the_kept_factors_into_the_model() -> None:
    model = cifar_resnet(20, checkpoint=None).eval()
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))]
    copy_out = convfx.compress(model, calib[0][:1], flops_target=0.6, calibration=calib, progress=False)
    gm = convfx.compress(model, calib[0][:1], flops_target=0.6, calibration=calib, inplace=True, progress=False)
    assert [r.ranks for r in gm.convfx_report.layers] == [r.ranks for r in copy_out.convfx_report.layers]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), copy_out(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), gm(x), rtol=1e-5, atol=1e-5)  # the model now holds the factors


def _stats(x_o: torch.Tensor, x_c: torch.Tensor) -> MomentStats:
    st = MomentStats(x_o.shape[1], x_o.device)
    st.add(x_o, x_c)
    return st


@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_strong_shrinkage_gives_the_weight_space_fit(method: str) -> None:
    """rho -> inf: the virtual isotropic rows dominate and the fit is the data-free one."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 10, 1, 1, generator=g, dtype=torch.float64)
    x = torch.randn(200, 10, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 10, dtype=torch.float64)
    geom = ConvGeometry(10, 12)
    ranks = (4,) if method == "svd" else (4, 10)
    _, w_hat, _ = fit_factors(w, geom, method, ranks, _stats(x, x), shrink=1e9)
    u, s, vh = torch.linalg.svd(w[:, :, 0, 0])
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(w_hat[:, :, 0, 0], best, atol=1e-6)
    _, w_data, _ = fit_factors(w, geom, method, ranks, _stats(x, x), shrink=0.0)
    assert float((w_data[:, :, 0, 0] - best).norm()) > 1e-3  # the data fit is a different one


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shrinkage_generalises_from_few_calibration_rows(seed: int) -> None:
    """Targets from the original model, inputs from a compressed prefix that adds error, and
    barely more rows than features: the pure data fit over-fits its rows; shrinkage costs a
    little error on them and gives less on fresh rows from the same distribution."""
    g = torch.Generator().manual_seed(seed)
    d, cout, r = 48, 48, 12
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    w = torch.randn(cout, d, 1, 1, generator=g, dtype=torch.float64)

    def rows(n: int) -> MomentStats:
        x_o = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T
        x_c = x_o + 0.3 * x_o.std(0) * torch.randn(n, d, generator=g, dtype=torch.float64)
        return _stats(x_o, x_c)

    st_calib, st_fresh = rows(80), rows(4000)
    errs = {}
    for rho in (0.0, 0.05):
        _, w_hat, in_sample = fit_factors(w, ConvGeometry(d, cout), "svd", (r,), st_calib, shrink=rho)
        errs[rho] = (in_sample, output_error(w[:, :, 0, 0], w_hat[:, :, 0, 0], st_fresh))
    assert errs[0.05][0] >= errs[0.0][0] - 1e-12  # the data fit is optimal on its own rows
    assert errs[0.05][1] < 0.95 * errs[0.0][1]  # ... but not on fresh ones


def _cp_kernel(cout: int, cin: int, k: int, rank: int, seed: int) -> torch.Tensor:
    """An exact rank-``rank`` CP kernel: Σ_r a_r ⊗ b_r ⊗ c_r ⊗ d_r."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(cout, rank, generator=g), torch.randn(cin, rank, generator=g)
    c, d = torch.randn(k, rank, generator=g), torch.randn(k, rank, generator=g)
    return torch.einsum("or,ir,hr,wr->oihw", a, b, c, d) / rank


def test_auto_picks_cp_where_a_layer_is_cp_low_rank() -> None:
    """Ground truth: a rank-4 CP kernel costs 4·(32+3+3+32) MACs/pixel as CP and 32·4+9·16+4·32 as
    exact Tucker-2, so at a budget between the two only cp can be exact."""
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(_cp_kernel(32, 32, 3, 4, seed=0))
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 32, 12, 12, generator=torch.Generator().manual_seed(1))
    cp_macs, tucker_macs = 4 * (32 + 3 + 3 + 32), 32 * 4 + 9 * 16 + 4 * 32
    target = (cp_macs + tucker_macs) / 2 / (32 * 32 * 9)
    gm = convfx.compress(model, x[:1], method="auto", flops_target=target, progress=False)
    (row,) = gm.convfx_report.factorized
    assert row.method == "cp" and row.ranks[0] >= 4, row
    assert row.macs_after <= target * row.macs_before
    assert _rel_out_err(model, gm, x) < 1e-2
    tucker = convfx.compress(model, x[:1], method="tucker", flops_target=target, progress=False)
    assert _rel_out_err(model, tucker, x) > 10 * _rel_out_err(model, gm, x)


def test_auto_with_calibration_is_never_further_from_the_original_than_tucker() -> None:
    """auto fits the tucker-only allocations too (the same ones method="tucker" fits) and keeps
    the closest, so its calibration discrepancy is at most tucker's."""
    model = cifar_resnet(20, checkpoint=None).eval()
    calib = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        y0 = [model(x) for x in calib]

    def discrepancy(gm: nn.Module) -> float:
        with torch.no_grad():
            return sum(output_discrepancy(gm(x), y) for x, y in zip(calib, y0)) / len(calib)

    auto = convfx.compress(model, calib[0][:1], method="auto", flops_target=0.4, calibration=calib, progress=False)
    tucker = convfx.compress(model, calib[0][:1], method="tucker", flops_target=0.4, calibration=calib,
                             progress=False)
    note = next(n for n in auto.convfx_report.notes if n.startswith("flops_target: allocations fitted"))
    assert "tucker+cp noise sensitivities" in note and "tucker noise sensitivities" in note, note
    assert discrepancy(auto) <= discrepancy(tucker) * (1 + 1e-6)
    assert auto.convfx_report.conv_macs_after <= 0.4 * auto.convfx_report.conv_macs_before
    assert {r.method for r in auto.convfx_report.factorized} <= {"tucker", "cp", "svd"}


def test_auto_needs_flops_target() -> None:
    with pytest.raises(ValueError, match="method: 'auto'.*flops_target"):
        convfx.compress(_two_convs(), torch.randn(1, 16, 8, 8), method="auto")
    with pytest.raises(ValueError, match="method: expected one of"):
        convfx.compress(_two_convs(), torch.randn(1, 16, 8, 8), method="Tucker")
