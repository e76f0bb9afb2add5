"""convfx.serialize: weights-only model files that rebuild without re-decomposing."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import convfx
from convfx import serialize, zoo
from convfx.checkpoint import atomic_save
from convfx.report import Report
from convfx.train import finetune
from passes.errors import UNKNOWN_ARCH, ConvfxError
from passes.factors import Factorized

# A few layers of different kinds (the 3-channel stem, a stride-2 conv, a deep conv) keep
# the decompositions cheap; the other convs stay as they are, which must round-trip too.
RESNET_RANKS: dict[str, dict[str, Any]] = {
    "tucker": {"conv1": (8, 3), "layer2.0.conv1": 6, "layer3.2.conv2": (12, 10)},
    "cp": {"conv1": 6, "layer2.0.conv1": 8, "layer3.2.conv2": 10},
    "svd": {"conv1": 4, "layer2.0.conv1": 8, "layer3.2.conv2": 12},
}
METHODS = list(RESNET_RANKS)


class PadConv(nn.Conv2d):
    """EfficientNet-style conv: a ZeroPad2d submodule, then F.conv2d on its own weight."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=True)
        self.static_padding = nn.ZeroPad2d((k // 2, (k - 1) // 2, k // 2, (k - 1) // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TinyNet(nn.Module):
    """Not in the registry: plain conv, functional-conv subclass, 1x1 conv and a Linear."""

    def __init__(self, width: int = 12, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.pad_conv = PadConv(width, 16, 3, stride=2)
        self.point = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.point(self.pad_conv(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# Tiny decompositions run many times faster single-threaded on busy CI machines.
pytestmark = pytest.mark.usefixtures("one_thread")


def _with_linear(module: nn.Module, fqn: str) -> bool:
    return True


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=METHODS)
def resnet_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                inputs: torch.Tensor) -> tuple[str, torch.fx.GraphModule, Path]:
    method = request.param
    torch.manual_seed(0)
    model = zoo.cifar_resnet(20).eval()
    gm = convfx.compress(model, inputs[:1], method=method, rank=RESNET_RANKS[method])
    path = tmp_path_factory.mktemp(f"resnet-{method}") / "model.pt"
    serialize.save(gm, path, arch=zoo.arch_name(model), normalization=zoo.normalization_of(model))
    return method, gm, path


@pytest.fixture(scope="module", params=METHODS)
def tiny_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              inputs: torch.Tensor) -> tuple[str, torch.fx.GraphModule, Path]:
    method = request.param
    torch.manual_seed(1)
    model = TinyNet().eval()
    gm = convfx.compress(model, inputs[:1], method=method, rank=0.5, filter_fn=_with_linear)
    path = tmp_path_factory.mktemp(f"tiny-{method}") / "tiny.pt"
    serialize.save(gm, path)
    return method, gm, path


def _assert_same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _plain_types_only(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (str, int, float, bool)):
        return True
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain_types_only(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain_types_only(v) for v in obj)
    return False


# ------------------------------------------------------------------------- round trips
def test_resnet_round_trip_by_registry_name(resnet_file: tuple[str, torch.fx.GraphModule, Path],
                                            inputs: torch.Tensor) -> None:
    method, gm, path = resnet_file
    loaded = serialize.load(path)
    _assert_same_model(gm, loaded, inputs)
    factorized = {n for n, m in loaded.named_modules() if isinstance(m, Factorized)}
    assert factorized == set(RESNET_RANKS[method])
    assert loaded.convfx_arch == "cifar_resnet20"
    assert loaded.convfx_normalization == zoo.CIFAR_NORMALIZATION
    assert loaded.convfx_report.to_dict() == gm.convfx_report.to_dict()
    assert not loaded.training


def test_file_is_weights_only_plain_data(resnet_file: tuple[str, torch.fx.GraphModule, Path]) -> None:
    _, gm, path = resnet_file
    raw = torch.load(path, weights_only=True)
    assert _plain_types_only(raw)
    assert raw["format"] == serialize.FORMAT and raw["arch"] == "cifar_resnet20"
    assert raw["input_shapes"] == [[1, 3, 32, 32]]
    assert set(raw["state_dict"]) == set(gm.state_dict())
    entry = raw["layers"]["layer2.0.conv1"]
    assert entry["geometry"]["stride"] == [2, 2] and entry["kind"] == "conv"


def test_custom_model_round_trip_via_model_argument(tiny_file: tuple[str, torch.fx.GraphModule, Path],
                                                    inputs: torch.Tensor) -> None:
    method, gm, path = tiny_file
    fresh = TinyNet()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = serialize.load(path, model=fresh)
    _assert_same_model(gm, loaded, inputs)
    # the caller's instance is left untouched
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert isinstance(fresh.pad_conv, PadConv)
    kinds = {n: m.plan.method for n, m in loaded.named_modules() if isinstance(m, Factorized)}
    assert kinds["head"] == "svd" and kinds["point"] == "svd"
    assert kinds["pad_conv"] == ("svd" if method == "svd" else method)


def test_functional_conv_subclass_keeps_its_padding(tiny_file: tuple[str, torch.fx.GraphModule, Path],
                                                    inputs: torch.Tensor) -> None:
    _, gm, path = tiny_file
    loaded = serialize.load(path, model=TinyNet())
    container = loaded.get_submodule("pad_conv")
    assert isinstance(container, Factorized)
    assert isinstance(container.static_padding, nn.ZeroPad2d)
    assert "static_padding" in loaded.code
    with torch.no_grad():
        assert torch.equal(gm.eval()(inputs), loaded.eval()(inputs))


def test_custom_model_without_model_argument_is_refused(tiny_file: tuple[str, torch.fx.GraphModule, Path]) -> None:
    _, _, path = tiny_file
    with pytest.raises(ConvfxError, match="does not name its architecture"):
        serialize.load(path)


def test_unbuildable_architecture_errors_carry_their_kind(tiny_file: tuple[str, torch.fx.GraphModule, Path],
                                                          tmp_path: Path) -> None:
    """The CLI offers ``--arch`` on this kind, whatever the wording."""
    _, gm, path = tiny_file
    unknown = serialize.save(gm, tmp_path / "unknown.pt", arch="not_a_registered_net")
    for p in (path, unknown):
        with pytest.raises(ConvfxError) as info:
            serialize.load(p)
        assert info.value.kind == UNKNOWN_ARCH


def test_report_json_round_trips_every_field(tmp_path: Path, inputs: torch.Tensor) -> None:
    """A calibrated report (output errors, notes, assumptions, a Linear row, a skipped row) reads back equal."""
    torch.manual_seed(2)
    gm = convfx.compress(TinyNet().eval(), None, rank=0.5, calibration=[inputs], progress=False,
                         filter_fn=lambda module, fqn: fqn != "point")
    report = gm.convfx_report
    assert report.assumptions and report.notes and report.seconds > 0
    assert any(r.output_error is not None for r in report.layers) and report.skipped
    assert any(r.kind == "linear" for r in report.layers)
    again = Report.from_json(report.to_json())
    for f in dataclasses.fields(Report):
        assert getattr(again, f.name) == getattr(report, f.name), f.name
    assert again == report
    path = serialize.save(gm, tmp_path / "tiny.pt")
    assert serialize.load(path, model=TinyNet()).convfx_report == report


def test_arch_attribute_is_picked_up_and_reload_resaves(tmp_path: Path, inputs: torch.Tensor,
                                                        resnet_file: tuple[str, torch.fx.GraphModule, Path]) -> None:
    _, gm, path = resnet_file
    loaded = serialize.load(path)
    again = serialize.save(loaded, tmp_path / "again.pt")  # arch comes from loaded.convfx_arch
    _assert_same_model(gm, serialize.load(again), inputs)


def test_version_1_files_keep_their_unfolded_tucker_layout(tmp_path: Path, inputs: torch.Tensor) -> None:
    """Files written before full-rank Tucker factors were folded still load, and re-save as they are."""
    torch.manual_seed(0)
    model = zoo.cifar_resnet(20).eval()
    # conv1: input factor folded (3 = C_in); layer1.0.conv1: both folded; layer2.0.conv1: none.
    ranks = {"conv1": (8, 3), "layer1.0.conv1": (16, 16), "layer2.0.conv1": (12, 10)}
    gm = convfx.compress(model, inputs[:1], method="tucker", rank=ranks)
    path = serialize.save(gm, tmp_path / "v2.pt", arch="cifar_resnet20")
    spec = torch.load(path, weights_only=True)
    # Write what version 1 stored for the same function: the square factors as explicit identities.
    state = dict(spec["state_dict"])
    for fqn, (keep_in, keep_out) in {"conv1": (False, True), "layer1.0.conv1": (False, False)}.items():
        mods = [state.pop(f"{fqn}.{i}.weight") for i in range(1 + keep_in + keep_out)]
        bias = state.pop(f"{fqn}.{len(mods) - 1}.bias", None)
        core = mods[0]
        eye_in = torch.eye(core.shape[1])[:, :, None, None]
        last = mods[1] if keep_out else torch.eye(core.shape[0])[:, :, None, None]
        for i, w in enumerate([eye_in, core, last]):
            state[f"{fqn}.{i}.weight"] = w
        if bias is not None:
            state[f"{fqn}.2.bias"] = bias
    v1 = dict(spec, version=1, state_dict=state,
              layers={k: {kk: vv for kk, vv in v.items() if kk != "fold_square"} for k, v in spec["layers"].items()})
    atomic_save(v1, tmp_path / "v1.pt")
    loaded = serialize.load(tmp_path / "v1.pt")
    counts = {n: m.n_factors for n, m in loaded.named_modules() if isinstance(m, Factorized)}
    assert counts == {"conv1": 3, "layer1.0.conv1": 3, "layer2.0.conv1": 3}
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), gm(inputs), rtol=1e-5, atol=1e-5)
    again = serialize.load(serialize.save(loaded, tmp_path / "again.pt"))
    _assert_same_model(loaded, again, inputs)


# ----------------------------------------------------------------------- training on
def _tiny_loader(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g))
    return DataLoader(ds, batch_size=4, shuffle=False)


def test_finetune_after_load_and_state_dict_artifact(tiny_file: tuple[str, torch.fx.GraphModule, Path],
                                                     tmp_path: Path, inputs: torch.Tensor) -> None:
    _, _, path = tiny_file
    model = serialize.load(path, model=TinyNet())
    assert all(p.requires_grad for p in model.parameters())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "ckpt"
    out = finetune(model, _tiny_loader(), epochs=1, lr=0.05, max_steps_per_epoch=1, progress=False,
                   checkpoint_dir=ckpt, seed=0)
    assert out["step"] == 1
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())

    sd = serialize.save_state_dict(model, tmp_path / "finetuned.pt")
    for source in (sd, ckpt / "last.pt"):
        again = serialize.load(path, model=TinyNet(), state_dict=source)
        _assert_same_model(model, again, inputs)
    # and onto an already loaded model
    third = serialize.load_state_dict(serialize.load(path, model=TinyNet()), sd)
    _assert_same_model(model, third, inputs)


# --------------------------------------------------------------------------- refusals
class _Payload:
    """Unpickling this would run a shell command; weights_only loading must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["reduce", "module", "class"])
def test_pickled_code_is_refused(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    obj: Any = {"reduce": lambda: {"format": serialize.FORMAT, "x": _Payload(str(marker))},
                "module": lambda: nn.Linear(2, 2),
                "class": lambda: {"format": serialize.FORMAT, "cls": TinyNet}}[payload]()
    torch.save(obj, bad)
    with pytest.raises(ConvfxError, match="pickled"):
        serialize.load(bad, model=TinyNet())
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_file_gives_clear_error(resnet_file: tuple[str, torch.fx.GraphModule, Path], tmp_path: Path,
                                        damage: str) -> None:
    _, _, path = resnet_file
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        # a byte in the middle of the largest tensor payload: only the digest notices
        mid = len(data) // 2
        data[mid] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a checkpoint at all" * 10)
    bad = tmp_path / "damaged.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(ConvfxError, match="corrupted|truncated|empty") as info:
        serialize.load(bad)
    assert str(bad) in str(info.value)


def test_missing_file_and_plain_state_dict(tmp_path: Path) -> None:
    with pytest.raises(ConvfxError, match="not found"):
        serialize.load(tmp_path / "nope.pt")
    sd = tmp_path / "sd.pt"
    torch.save(TinyNet().state_dict(), sd)
    with pytest.raises(ConvfxError, match="not a convfx model file") as info:
        serialize.load(sd, model=TinyNet())
    assert "state_dict=" in str(info.value)


@pytest.mark.parametrize("wrong, match", [
    (lambda: zoo.cifar_resnet(32), "saved from 'cifar_resnet20'"),
    (lambda: TinyNet(), "not convolutions of this model"),
    (lambda: zoo.CifarResNet(3, num_classes=100), "shape mismatch"),
])
def test_wrong_architecture_is_a_clear_error(resnet_file: tuple[str, torch.fx.GraphModule, Path],
                                             wrong: Any, match: str) -> None:
    _, _, path = resnet_file
    with pytest.raises(ConvfxError, match=match):
        serialize.load(path, model=wrong())


def test_changed_layer_geometry_is_named(tiny_file: tuple[str, torch.fx.GraphModule, Path]) -> None:
    _, _, path = tiny_file
    with pytest.raises(ConvfxError, match="geometry differs") as info:
        serialize.load(path, model=TinyNet(width=8))
    assert "stem" in str(info.value)


def test_save_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nn.Module"):
        serialize.save("model", tmp_path / "x.pt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="arch"):
        serialize.save(TinyNet(), tmp_path / "x.pt", arch="")


class MixedDtypeNet(nn.Module):
    """A float32 conv feeding one float64 conv (a model that mixes dtypes on purpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 10, 3, padding=1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)).double())


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_load_keeps_each_tensors_dtype(tmp_path: Path, method: str) -> None:
    """Loading must not cast a mixed-dtype model to its first floating dtype (issue 22, finding 2)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = convfx.compress(MixedDtypeNet().eval(), x, method=method, rank=0.5)
    path = serialize.save(gm, tmp_path / "mixed.pt")
    loaded = serialize.load(path, model=MixedDtypeNet())
    want = {k: v.dtype for k, v in gm.state_dict().items()}
    got = {k: v.dtype for k, v in loaded.state_dict().items()}
    assert got == want and torch.float64 in got.values() and torch.float32 in got.values()
    out = loaded(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, gm(x), rtol=0, atol=0)
