"""The core compiler: exactness at full rank, structure, MAC counts, reports, errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convfx
from convfx import ConvfxError
from passes.factors import Factorized, FactorPlan, decompose_weights

torch.manual_seed(0)
F64 = torch.float64


class StaticSamePadConv(nn.Conv2d):
    """Like EfficientNet-Lite's conv: pads with a submodule, then F.conv2d on its own weight."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=True)
        self.static_padding = nn.ZeroPad2d((k // 2, (k - 1) // 2, k // 2, (k - 1) // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FunctionalConv(nn.Module):
    """A conv written by hand: F.conv2d on the module's own parameters."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, stride=(1, 2), padding=(1, 2), dilation=(1, 2))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 10, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Wrap(nn.Module):
    """One conv (or anything) with a head, so every variant is a small model."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 1.5


VARIANTS: dict[str, nn.Module] = {
    "plain3x3": nn.Conv2d(6, 10, 3),
    "nonsquare": nn.Conv2d(6, 9, (3, 5), padding=(1, 2)),
    "stride2": nn.Conv2d(6, 10, 3, stride=2, padding=1),
    "stride_tuple": nn.Conv2d(6, 10, (5, 3), stride=(2, 1), padding=(2, 0)),
    "pad_same": nn.Conv2d(6, 10, (4, 3), padding="same"),
    "pad_valid": nn.Conv2d(6, 10, 3, padding="valid"),
    "dilation": nn.Conv2d(6, 10, 3, padding=2, dilation=2),
    "dilation_tuple": nn.Conv2d(6, 10, (3, 3), padding=(1, 3), dilation=(1, 3), stride=(1, 2)),
    "bias": nn.Conv2d(6, 10, 3, padding=1, bias=True),
    "nobias": nn.Conv2d(6, 10, 3, padding=1, bias=False),
    "reflect": nn.Conv2d(6, 10, 3, padding=1, padding_mode="reflect"),
    "replicate": nn.Conv2d(6, 10, (3, 5), padding=(1, 2), padding_mode="replicate"),
    "circular": nn.Conv2d(6, 10, 3, padding=1, stride=2, padding_mode="circular"),
    "pointwise": nn.Conv2d(6, 10, 1, bias=True),
    "pointwise_stride_pad": nn.Conv2d(6, 10, 1, stride=2, padding=1, bias=True),
    "subclass_forward": StaticSamePadConv(6, 10, 3, stride=2),
    "functional": FunctionalConv(6, 10),
    "conv_bn": ConvBN(),
}


def _model(name: str) -> nn.Module:
    import copy

    return Wrap(copy.deepcopy(VARIANTS[name])).to(F64).eval()


@pytest.mark.parametrize("method", ["tucker", "svd"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_full_rank_reproduces_every_conv_variant(name: str, method: str) -> None:
    model = _model(name)
    x = torch.randn(2, 6, 13, 11, dtype=F64)
    gm = convfx.compress(model, x, method=method, rank=1.0)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-9, atol=1e-9)
    rep = gm.convfx_report
    assert len(rep.factorized) == 1, rep.to_table()
    assert all(r.rel_error is not None and r.rel_error < 1e-12 for r in rep.factorized)


@pytest.mark.parametrize("ranks", [("full", 3), (4, "full"), ("full", "full"), (4, 3)])
@pytest.mark.parametrize("name", ["plain3x3", "nonsquare", "stride_tuple", "pad_same", "reflect", "bias",
                                  "subclass_forward", "functional", "conv_bn"])
def test_square_tucker_factors_fold_into_the_core_without_changing_the_function(
        name: str, ranks: tuple[int | str, int | str]) -> None:
    """A full-rank Tucker factor is a square 1x1 conv: folded away, the layer computes the same
    conv with the Tucker-reconstructed kernel, with one layer (and its MACs) less per fold."""
    model = _model(name)
    owner = model.body.conv if name == "conv_bn" else model.body
    cout, cin = owner.weight.shape[:2]
    r_out, r_in = (cout if ranks[0] == "full" else ranks[0]), (cin if ranks[1] == "full" else ranks[1])
    x = torch.randn(2, 6, 13, 11, dtype=F64)
    gm = convfx.compress(model, x, method="tucker", rank=(r_out, r_in))
    container = next(m for m in gm.modules() if isinstance(m, Factorized))
    assert container.n_factors == 1 + (r_in < cin) + (r_out < cout)
    first, core, last = decompose_weights(owner.weight, owner.bias, container.geometry,
                                          FactorPlan("tucker", (r_out, r_in)))[0]
    w_hat = torch.einsum("abhw,oa,bi->oihw", core, last[:, :, 0, 0], first[:, :, 0, 0])
    ref = _model(name)
    with torch.no_grad():
        (ref.body.conv if name == "conv_bn" else ref.body).weight.copy_(w_hat)
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["plain3x3", "nonsquare", "stride_tuple", "pad_same", "dilation_tuple",
                                  "reflect", "replicate", "circular", "subclass_forward", "functional"])
def test_cp_structure_matches_its_own_reconstruction(name: str) -> None:
    """CP's four convs compute exactly the conv with the CP-reconstructed kernel."""
    model = _model(name)
    x = torch.randn(2, 6, 13, 11, dtype=F64)
    gm = convfx.compress(model, x, method="cp", rank=12)
    (row,) = gm.convfx_report.factorized
    container = next(m for m in gm.modules() if isinstance(m, Factorized))
    if row.method == "svd":
        return
    first, vert, horiz, last = (container.get_submodule(str(i)).weight for i in range(4))
    # Rebuild the full kernel from the four factors and run the original conv with it.
    w_hat = torch.einsum("rc,rh,rw,or->ochw", first[:, :, 0, 0], vert[:, 0, :, 0], horiz[:, 0, 0, :], last[:, :, 0, 0])
    ref = _model(name)
    with torch.no_grad():
        owner = ref.body.conv if name == "conv_bn" else ref.body
        owner.weight.copy_(w_hat)
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-9, atol=1e-9)


def test_cp_error_falls_with_rank_and_gets_small() -> None:
    conv = nn.Conv2d(6, 8, 3, padding=1).to(F64)
    x = torch.randn(1, 6, 8, 8, dtype=F64)
    errs = []
    for r in (2, 8, 24, 48):
        gm = convfx.compress(Wrap(conv), x, method="cp", rank=r)
        errs.append(gm.convfx_report.factorized[0].rel_error)
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3, errs


@pytest.mark.parametrize("method", ["tucker", "svd"])
@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("alexnet", 64)])
def test_full_rank_end_to_end_torchvision(arch: str, size: int, method: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10).to(F64).eval()
    x = torch.randn(2, 3, size, size, dtype=F64)
    gm = convfx.compress(model, x, method=method, rank=1.0)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-8, atol=1e-10)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(gm.convfx_report.factorized) == n_convs


def _conv_macs(n: int, cin: int, cout: int, k: tuple[int, int], oh: int, ow: int, groups: int = 1) -> int:
    return n * cout * oh * ow * (cin // groups) * k[0] * k[1]


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1), (1, 0)])
@pytest.mark.parametrize("ranks", [(4, 3), (10, 3), (4, 6), (10, 6), (1, 1)])
def test_macs_match_the_analytic_formula_before_and_after(stride: int, pad: int, ranks: tuple[int, int]) -> None:
    n, cin, cout, h, w, k = 2, 6, 10, 12, 9, (3, 3)
    model = Wrap(nn.Conv2d(cin, cout, k, stride=stride, padding=pad))
    x = torch.randn(n, cin, h, w)
    oh = (h + 2 * pad - k[0]) // stride + 1
    ow = (w + 2 * pad - k[1]) // stride + 1
    before = convfx.analyze(model, x)
    assert before.conv_macs == _conv_macs(n, cin, cout, k, oh, ow)
    gm = convfx.compress(model, x, method="tucker", rank=ranks)
    r_out, r_in = ranks
    # A 1x1 factor at full channel rank is square; it is folded into the core.
    keep_in, keep_out = r_in < cin, r_out < cout
    want = (keep_in * _conv_macs(n, cin, r_in, (1, 1), h, w) + _conv_macs(n, r_in, r_out, k, oh, ow)
            + keep_out * _conv_macs(n, r_out, cout, (1, 1), oh, ow))
    after = convfx.analyze(gm, x)
    assert after.conv_macs == want
    assert sum(layer.macs for layer in after.layers) == want
    assert len(after.layers) == 1 + keep_in + keep_out
    row = gm.convfx_report.factorized[0]
    assert (row.macs_before, row.macs_after) == (before.conv_macs, want)
    assert row.params_after == cin * r_in * keep_in + r_in * r_out * 9 + r_out * cout * keep_out + cout


def test_cp_and_svd_macs_match_formula() -> None:
    n, cin, cout, h, w, r = 1, 8, 12, 10, 10, 5
    model = Wrap(nn.Conv2d(cin, cout, (3, 5), stride=(2, 1), padding=(1, 2)))
    x = torch.randn(n, cin, h, w)
    oh, ow = (h + 2 - 3) // 2 + 1, (w + 4 - 5) // 1 + 1
    gm = convfx.compress(model, x, method="cp", rank=r)
    want = n * (h * w * cin * r + oh * w * r * 3 + oh * ow * r * 5 + oh * ow * r * cout)
    assert convfx.analyze(gm, x).conv_macs == want
    gm = convfx.compress(model, x, method="svd", rank=r)
    assert convfx.analyze(gm, x).conv_macs == n * oh * ow * r * (cin * 15 + cout)


def test_factor_names_keep_the_original_name_and_no_full_conv_remains() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = convfx.compress(model, x, method="tucker", rank=0.5)
    keys = set(gm.state_dict())
    assert {"layer1.0.conv2.0.weight", "layer1.0.conv2.1.weight", "layer1.0.conv2.2.weight"} <= keys
    assert "layer1.0.conv2.weight" not in keys
    assert {"layer2.0.downsample.0.0.weight", "layer2.0.downsample.0.1.weight"} <= keys  # 1x1 → SVD
    skipped = {r.fqn for r in gm.convfx_report.skipped}
    originals = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d):
            assert node.target not in originals or node.target in skipped, node.target
    # the report has one row per original conv
    assert {r.fqn for r in gm.convfx_report.layers} == originals


def test_original_untouched_unless_inplace() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convfx.compress(model, x, rank=0.5)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    gm = convfx.compress(model, x, rank=0.5, inplace=True)
    assert isinstance(model.layer1[0].conv1, Factorized)
    torch.testing.assert_close(model(x), gm(x))


def test_compress_without_inputs_assumes_and_reports() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    gm = convfx.compress(model, rank=0.5)
    rep = gm.convfx_report
    assert rep.input_shapes == [(1, 3, 224, 224)]
    assert any("224" in a for a in rep.assumptions)
    assert "assumption" in rep.to_table()


def test_shared_conv_called_twice_is_factorized_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.relu(self.conv(x)))

    model = Twice().to(F64)
    x = torch.randn(1, 8, 9, 9, dtype=F64)
    gm = convfx.compress(model, x, method="svd", rank=1.0)
    torch.testing.assert_close(gm(x), model(x))
    assert len(gm.convfx_report.factorized) == 1
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("conv.1") == 2
    assert gm.convfx_report.factorized[0].macs_before == 2 * 8 * 8 * 9 * 81


def test_linear_only_when_selected() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 20)).to(F64)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    gm = convfx.compress(model, x, rank=1.0)
    assert isinstance(gm.get_submodule("2"), nn.Linear)
    gm = convfx.compress(model, x, rank=1.0, filter_fn=lambda m, name: isinstance(m, nn.Linear))
    fac = gm.get_submodule("2")
    assert isinstance(fac, Factorized) and isinstance(fac.get_submodule("0"), nn.Linear)
    assert isinstance(gm.get_submodule("0"), nn.Conv2d)
    assert any(r.fqn == "0" and r.skipped == "excluded by filter_fn" for r in gm.convfx_report.layers)
    torch.testing.assert_close(gm(x), model(x))


def test_depthwise_grouped_and_unsupported_are_reported_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3),
                          nn.ConvTranspose2d(8, 4, 2))
    x = torch.randn(1, 8, 16, 16)
    gm = convfx.compress(model, x, rank=0.5)
    reasons = {r.fqn: r.skipped for r in gm.convfx_report.layers}
    assert "depthwise" in reasons["0"] and "grouped" in reasons["1"] and reasons["2"] is None
    assert reasons["3"] is None  # transposed convs are factorized too (tests/test_convnd.py)
    assert "skipped" in gm.convfx_report.to_table()


def test_automatic_rank_skips_layers_that_would_not_shrink() -> None:
    # 3 input channels with a full-rank random kernel: Tucker-2 cannot save anything.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 64, 3))
    x = torch.randn(1, 3, 12, 12)
    gm = convfx.compress(model, x, rank="energy:1.0")
    reasons = {r.fqn: r.skipped for r in gm.convfx_report.layers}
    assert reasons["0"] is not None and "would not reduce MACs" in reasons["0"]
    # explicit ranks are honoured even when they save nothing
    gm = convfx.compress(model, x, rank=1.0)
    assert all(r.skipped is None for r in gm.convfx_report.layers)


def test_vbmf_ranks_are_positive_and_reduce_a_low_rank_layer() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    with torch.no_grad():  # a low-rank kernel plus a little noise
        core = torch.randn(8, 8, 3, 3)
        conv.weight.copy_(torch.einsum("abhw,oa,ib->oihw", core, torch.randn(64, 8), torch.randn(64, 8))
                          + 0.01 * torch.randn(64, 64, 3, 3))
    gm = convfx.compress(Wrap(conv), torch.randn(1, 64, 16, 16), rank="vbmf")
    (row,) = gm.convfx_report.factorized
    assert all(1 <= r <= 64 for r in row.ranks) and max(row.ranks) < 32
    assert row.rel_error < 0.05


@pytest.mark.parametrize("rank,frac_ranks", [(0.5, (5, 3)), (0.25, (3, 2)), (1.0, (10, 6))])
def test_float_rank_is_ceil_fraction_per_mode(rank: float, frac_ranks: tuple[int, int]) -> None:
    gm = convfx.compress(Wrap(nn.Conv2d(6, 10, 3)), torch.randn(1, 6, 8, 8), rank=rank)
    assert gm.convfx_report.factorized[0].ranks == frac_ranks
    assert frac_ranks == (math.ceil(rank * 10), math.ceil(rank * 6))


def test_rank_dict_per_layer() -> None:
    model = nn.Sequential(nn.Conv2d(6, 10, 3), nn.Conv2d(10, 10, 3))
    gm = convfx.compress(model, torch.randn(1, 6, 12, 12), rank={"0": (4, 2)})
    by = {r.fqn: r for r in gm.convfx_report.layers}
    assert by["0"].ranks == (4, 2) and by["1"].skipped is not None


def test_report_table_and_json() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    gm = convfx.compress(model, torch.randn(1, 3, 64, 64), rank=0.5)
    table = gm.convfx_report.to_table()
    assert "MACs" in table and "GFLOPs (2xMACs)" in table and "layer1.0.conv1" in table
    data = json.loads(gm.convfx_report.to_json())
    assert data["conv_macs_after"] < data["conv_macs_before"]
    assert len(data["layers"]) == 20
    ana = convfx.analyze(gm, torch.randn(1, 3, 64, 64))
    assert ana.conv_macs == data["conv_macs_after"]
    assert sum(layer.macs for layer in ana.layers if layer.op == "Conv2d") == ana.conv_macs


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,word", [
    ({"method": "tt"}, "method"),
    ({"rank": 0}, "rank"),
    ({"rank": -3}, "rank"),
    ({"rank": 1.5}, "rank"),
    ({"rank": 0.0}, "rank"),
    ({"rank": "energy:1.7"}, "rank"),
    ({"rank": "bogus"}, "rank"),
    ({"rank": (4,)}, "rank"),
    ({"rank": (99, 2)}, "rank"),
    ({"rank": 11}, "rank"),
    ({"rank": {"nope": 3}}, "rank"),
    ({"filter_fn": 3}, "filter_fn"),
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs: dict, word: str) -> None:
    model = Wrap(nn.Conv2d(6, 10, 3))
    with pytest.raises(ValueError, match=word):
        convfx.compress(model, torch.randn(1, 6, 8, 8), **kwargs)


def test_example_inputs_type_error() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        convfx.compress(Wrap(nn.Conv2d(6, 10, 3)), "image")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_name_the_layer(bad: float) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = bad
    with pytest.raises(ConvfxError, match=r"\[1\].*NaN or inf"):
        convfx.compress(model, torch.randn(1, 3, 10, 10), rank=0.5)


def test_inputs_that_do_not_fit_name_the_node() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ConvfxError, match=r"\[conv1 \(call_module Conv2d\)\].*do not fit"):
        convfx.compress(model, torch.randn(1, 4, 32, 32))
    with pytest.raises(ConvfxError, match=r"^\[1 \(call_module Linear\)\] example_inputs do not fit[^\n]*$"):
        convfx.analyze(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)).eval(), torch.randn(1, 3, 3))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.conv(x)
        return -self.conv(x)


def test_untraceable_submodule_becomes_a_leaf_and_is_reported() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DataDependent()).to(F64)
    x = torch.randn(1, 3, 10, 10, dtype=F64)
    gm = convfx.compress(model, x, rank=1.0)
    by = {r.fqn: r for r in gm.convfx_report.layers}
    assert by["0"].skipped is None
    assert "could not be traced" in by["1.conv"].skipped
    assert any("'1'" in n for n in gm.convfx_report.notes)
    torch.testing.assert_close(gm(x), model(x))


def test_untraceable_root_is_compressed_through_its_traceable_parts() -> None:
    model, x = DataDependent().to(F64), torch.randn(1, 8, 5, 5, dtype=F64)
    out = convfx.compress(model, x, rank=1.0, progress=False)
    assert type(out) is DataDependent and out is not model  # the user's class, a copy
    assert [p["path"] for p in out.convfx_parts["parts"]] == ["conv"]
    assert any("DataDependent" in n or "root" in n for n in out.convfx_report.notes)
    torch.testing.assert_close(out(x), model(x))


def test_analyze_plain_and_inputs_inferred() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 224 * 224, 2))
    a = convfx.analyze(model)
    assert a.conv_macs == _conv_macs(1, 3, 4, (3, 3), 224, 224)
    assert a.total_macs == a.conv_macs + 4 * 224 * 224 * 2
    assert a.params == sum(p.numel() for p in model.parameters())
    assert a.assumptions and a.conv_gflops == pytest.approx(2 * a.conv_macs / 1e9)


class _ReadsWeightDtype(nn.Module):
    """``x.to(self.conv.weight.dtype)``: timm's edgenext positional encoding and many HF modules."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv.weight.dtype).to(self.conv.bias.device)
        if self.functional:
            return F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        return self.conv(x)


class _ReadsWeightValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.conv.weight.mean()


class _StandardizedConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("functional", [False, True])
def test_dtype_and_device_reads_of_a_factorized_weight_keep_working(functional: bool) -> None:
    model = _ReadsWeightDtype(functional).to(torch.float64).eval()
    x = torch.randn(2, 8, 10, 10, dtype=torch.float32)  # the model casts it to float64 itself
    gm = convfx.compress(model, x, rank=1.0)
    assert [r.fqn for r in gm.convfx_report.factorized] == ["conv"]
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-10)


def test_other_reads_of_a_weight_skip_the_layer_with_a_reason() -> None:
    model = _ReadsWeightValues().eval()
    x = torch.randn(1, 8, 10, 10)
    gm = convfx.compress(model, x, rank=1.0)
    (row,) = gm.convfx_report.skipped
    assert row.fqn == "conv" and "also read by other graph nodes" in row.skipped
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))


def test_computed_weight_is_reported_once_under_its_module() -> None:
    model = nn.Sequential(_StandardizedConv(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3)).eval()
    gm = convfx.compress(model, torch.randn(1, 4, 12, 12), rank=1.0)
    skipped = gm.convfx_report.skipped
    assert [(r.fqn, "computed in forward" in r.skipped) for r in skipped] == [("0", True)]
    assert [r.fqn for r in gm.convfx_report.factorized] == ["1"]
