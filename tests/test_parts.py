"""Models whose root ``forward`` cannot be traced: their traceable parts are compressed in place."""
from __future__ import annotations

import collections
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convfx
from convfx import ConvfxError
from convfx.cli import main as cli_main
from passes.factors import Factorized
from passes.parts import Bank, flatten, unflatten

F64 = torch.float64


class Backbone(nn.Module):
    """Two feature maps in an OrderedDict, as torchvision's IntermediateLayerGetter returns them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.stem(x)
        return collections.OrderedDict([("a", a), ("b", self.down(a))])


class Neck(nn.Module):
    """A dict in, a dict out (an FPN's interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.lateral = nn.ModuleDict({"a": nn.Conv2d(16, 16, 1), "b": nn.Conv2d(32, 16, 1)})

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.lateral[k](v) for k, v in feats.items()}


class Gate(nn.Module):
    """Untraceable itself (a branch on a value), with a traceable block inside."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y if y.mean() > 0 else -y


class Head(nn.Module):
    """A list of levels in, one output per level: its convs run at every resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.out(torch.relu(self.conv(x))) for x in levels]


class Detectorish(nn.Module):
    """A root a trace cannot take: a list of images in, a branch on a value, a conv used as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = Neck()
        self.gate = Gate()
        self.head = Head()
        self.extra = nn.Conv2d(4, 4, 1)  # only its weight is used, by the root

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.stack(images)
        feats = self.neck(self.backbone(x))
        outs = self.head([self.gate(feats["a"]), feats["b"]])
        if outs[0].abs().sum() > 0:
            outs = [F.conv2d(o, self.extra.weight, self.extra.bias) for o in outs]
        return outs


PARTS = ["backbone", "neck", "gate.block", "head"]


def _bump_first(sizes: list[Any]) -> Any:
    sizes[0] = sizes[0] + 1  # mutates its argument, as torchvision's Swin3d window helper does
    return sizes[0]


torch.fx.wrap("_bump_first")  # kept as one call in the graph, which then passes it an immutable list


class GraphFails(nn.Module):
    """A root that traces, but whose graph fails where its forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * _bump_first([x.shape[-1]])


def _model(dtype: torch.dtype = F64) -> Detectorish:
    torch.manual_seed(0)
    model = Detectorish().to(dtype).eval()
    with torch.no_grad():  # BN statistics that differ from the identity
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
    return model


def _images(n: int = 1, dtype: torch.dtype = F64, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 16, 20, generator=g).to(dtype) for _ in range(n)]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-10) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _part_outputs(model: nn.Module, images: list[torch.Tensor]) -> dict[str, list[Any]]:
    """Every part's outputs on ``images`` (forward hooks), flattened to tensors."""
    seen: dict[str, list[Any]] = {p: [] for p in PARTS}

    def hook(path: str) -> Any:
        def record(_m: nn.Module, _args: Any, out: Any) -> None:
            flatten(out, seen[path])
        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in PARTS]
    try:
        with torch.no_grad():
            model([*images])
    finally:
        for h in handles:
            h.remove()
    return seen


def test_full_rank_reproduces_every_part_and_the_model() -> None:
    model, images = _model(), _images()
    out = convfx.compress(model, (images,), rank=1.0, progress=False)
    assert type(out) is Detectorish and out is not model  # the user's class, a copy
    assert isinstance(out.head.conv, Factorized) and isinstance(out.backbone.stem[0], Factorized)
    assert not isinstance(model.head.conv, Factorized)  # the original is untouched
    with torch.no_grad():
        _close(out(images), model(images))
        _close(out(_images(2, seed=5)), model(_images(2, seed=5)))  # other inputs: the user's code runs
    got, ref = _part_outputs(out, images), _part_outputs(model, images)
    for p in PARTS:
        _close(got[p], ref[p])


def test_report_names_parts_and_every_conv_with_its_full_path() -> None:
    model = _model()
    out = convfx.compress(model, (_images(),), rank=1.0, progress=False)
    rep = out.convfx_report
    assert [p["path"] for p in out.convfx_parts["parts"]] == PARTS
    notes = "\n".join(rep.notes)
    assert "root cannot be traced" in notes and "Parts: backbone, neck, gate.block, head" in notes
    assert "not traced: 'gate': TraceError" in notes
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [r.fqn for r in rep.layers] == convs  # every conv of the whole model, in module order
    state = model.state_dict()
    assert all(f"{r.fqn}.weight" in state for r in rep.layers)  # state-dict keys map one-to-one
    extra = next(r for r in rep.layers if r.fqn == "extra")
    assert "used as a function" in extra.skipped and "the root" in extra.skipped
    assert extra.macs_before == extra.macs_after == 4 * 4 * (16 * 20 + 8 * 10)  # counted, untouched
    assert len(rep.factorized) == len(convs) - 1
    assert any("first conv saw an input of shape 1x3x16x20" in a for a in rep.assumptions)
    a = convfx.analyze(model, (_images(),))
    assert a.conv_macs == rep.conv_macs_before and a.layers[0].fqn == "backbone.stem.0"
    assert convfx.analyze(out, (_images(),)).conv_macs == rep.conv_macs_after


@pytest.mark.parametrize("calibrated", [False, True])
def test_flops_target_holds_over_the_whole_model(calibrated: bool) -> None:
    model = _model(torch.float32)
    calib = [_images(2, torch.float32, seed=s) for s in range(3)] if calibrated else None
    out = convfx.compress(model, (_images(1, torch.float32),), flops_target=0.5, calibration=calib,
                          progress=False)
    rep = out.convfx_report
    before = convfx.analyze(model, (_images(1, torch.float32),)).conv_macs
    after = convfx.analyze(out, (_images(1, torch.float32),)).conv_macs
    assert rep.conv_macs_before == before and rep.conv_macs_after == after
    assert 0.45 * before <= after <= 0.5 * before  # the untouched "extra" conv counts as a fixed cost
    head = next(r for r in rep.layers if r.fqn == "head.conv")  # called at two resolutions
    assert head.macs_before == 16 * 16 * 9 * (16 * 20 + 8 * 10)
    if calibrated:
        assert any("3 calibration item(s)" in n for n in rep.notes)
        assert any(r.fit == "data" for r in rep.factorized)


def test_calibration_items_are_shaped_like_example_inputs() -> None:
    model, images = _model(torch.float32), _images(1, torch.float32)
    items = [_images(1, torch.float32, seed=7), (_images(1, torch.float32, seed=8), "targets dropped")]
    out = convfx.compress(model, (images,), rank=0.5, calibration=items, progress=False)
    assert any("2 calibration item(s)" in n for n in out.convfx_report.notes)
    with pytest.raises(ConvfxError, match=r"\[calibration\] item 0 does not fit the model"):
        convfx.compress(model, (images,), rank=0.5, calibration=[torch.randn(2, 5)], progress=False)


def test_save_load_and_cli_report_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, images = _model(), _images()
    out = convfx.compress(model, (images,), rank=0.5, progress=False)
    path = convfx.save(out, tmp_path / "parts.pt")
    back = convfx.load(path, model=_model())
    assert type(back) is Detectorish and back.convfx_parts == out.convfx_parts
    with torch.no_grad():
        _close(back(images), out(images))
    assert back.convfx_report.to_dict() == out.convfx_report.to_dict()
    convfx.save(back, tmp_path / "again.pt")  # a loaded part model saves again
    assert cli_main(["report", str(path)]) == 0
    assert "head.conv" in capsys.readouterr().out


def test_inplace_and_method_id(tmp_path: Path) -> None:
    model = _model(torch.float32)
    images = _images(1, torch.float32)
    ref = copy.deepcopy(model)
    out = convfx.compress(model, (images,), rank=1.0, inplace=True, progress=False)
    assert out is model and isinstance(model.head.conv, Factorized)
    with torch.no_grad():
        _close(out(images), ref(images), 1e-4)
    calib = [_images(2, torch.float32, seed=s) for s in range(2)]
    narrowed = convfx.compress(ref, (images,), method="id", flops_target=0.95, calibration=calib, progress=False)
    assert narrowed.convfx_report.widths == {"backbone.stem.3": narrowed.backbone.stem[3].in_channels}
    assert narrowed.backbone.stem[1].num_features < 16  # the BN between them narrowed too, in the model
    back = convfx.load(convfx.save(narrowed, tmp_path / "id.pt"), model=_model(torch.float32))
    with torch.no_grad():
        _close(back(images), narrowed(images))


def test_refusals_name_the_model_or_argument() -> None:
    class NoPart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.conv.weight) if x.sum() > 0 else x

    with pytest.raises(ConvfxError, match=r"^\[NoPart\] cannot be traced.*no submodule with convolutions traces"):
        convfx.compress(NoPart(), torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"^distill_steps: the model's root cannot be traced"):
        convfx.compress(_model(torch.float32), (_images(1, torch.float32),), rank=0.5, distill_steps=2,
                        calibration=[_images(1, torch.float32)], progress=False)
    with pytest.raises(ConvfxError, match=r"\[Detectorish\] example_inputs do not fit the model"):
        convfx.compress(_model(), (torch.randn(3, 4),), rank=0.5)


def test_a_graph_that_fails_where_the_model_runs_is_compressed_by_parts() -> None:
    model, x = GraphFails().to(F64).eval(), torch.randn(1, 3, 6, 6, dtype=F64)
    out = convfx.compress(model, x, rank=1.0, progress=False)
    assert type(out) is GraphFails and isinstance(out.conv, Factorized)
    assert "its traced graph fails where its forward runs (TypeError" in out.convfx_report.notes[0]
    with torch.no_grad():
        _close([out(x)], [model(x)])


def test_argument_specs_round_trip_and_bank_stacks() -> None:
    value = ([torch.ones(1)], {"k": (None, 2.5, torch.Size([3]))}, collections.OrderedDict(a=torch.zeros(2)))
    leaves: list[Any] = []
    spec = flatten(value, leaves)
    assert len(leaves) == 2
    back = unflatten(spec, iter(leaves))
    assert type(back[2]) is collections.OrderedDict and back[1]["k"] == (None, 2.5, torch.Size([3]))
    bank = Bank([[torch.zeros(1, 2)], [torch.ones(2, 2)], [torch.ones(1, 3)]])
    assert bank(torch.tensor([0, 1]))[0].shape == (3, 2)  # items of one trailing shape are stacked
    assert bank(torch.tensor([0, 2]))[0].shape == (1, 2)  # otherwise the first item alone


def test_torchvision_detector_full_rank_end_to_end() -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=80, box_score_thresh=0.0).eval().to(F64)
    images = [torch.rand(3, 60, 80, dtype=F64)]
    # Random-init BN statistics from the example, so that activations neither vanish nor tie every score.
    convfx.recalibrate_bn(model, [images[0][None]], 1)
    out = convfx.compress(model, (images,), rank=1.0, progress=False)
    assert [p["path"] for p in out.convfx_parts["parts"]] == ["backbone", "rpn.head"]
    rep = out.convfx_report
    assert all(r.factorized or "depthwise" in r.skipped for r in rep.layers)
    with torch.no_grad():
        ref, got = model(images), out(images)
    assert len(ref[0]["boxes"]) > 0
    for k in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[0][k], ref[0][k], rtol=1e-9, atol=1e-9)
