"""Run convfx over torchvision / timm classification models, hand-built 1-d / 3-d / transposed-conv
models, and torchvision's segmentation, detection, keypoint, video and optical-flow builders: trace,
full-rank exactness, reductions, time.

For each model (random init, eval mode, smallest input it accepts): trace ok?; convs found /
factorized / skipped (with reasons); full-rank Tucker output (SVD for 1x1 convs) vs eager, in
float64; conv-MAC reduction at rank="vbmf" and at flops_target=0.5 (float32); seconds. Anything
other than success or a ConvfxError naming the module is a failure of convfx, reported as such.

Weight tensors that a builder initialises to exactly zero (ViT heads, timm's zero-init last BN
of residual blocks) would make the exactness check vacuous (a zero output matches anything);
they are re-drawn at random before the check and the row says so.

Rows are cached (JSON, one entry per model, written after each model), so a sweep can be
stopped and continued; the markdown is regenerated from every cached row of the suite.
Each model runs in a child process by default (a crash, OOM kill or timeout costs one row).

    python benchmarks/coverage.py --out benchmarks/results/coverage.md             # every torchvision builder
    python benchmarks/coverage.py --suite timm --out benchmarks/results/coverage_timm.md
    python benchmarks/coverage.py --suite convnd --out benchmarks/results/coverage_convnd.md  # Conv1d/3d, ConvTranspose
    python benchmarks/coverage.py --suite tasks --out benchmarks/results/coverage_torchvision_tasks.md  # detectors, ...
    python benchmarks/coverage.py --models resnet18,mobilenet_v3_small --cache '' --out /tmp/c.md
    python benchmarks/coverage.py --report-only --out benchmarks/results/coverage.md  # markdown from the cache
    python benchmarks/coverage.py --models regnet_y_128gf --rerun --lean --exact-only  # huge model, less memory
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import fcntl
import gc
import json
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

import convfx  # noqa: E402

TOL = 1e-8
# torchvision's RAFT builds its coordinate grids and flow as float32 whatever the model's dtype, so its
# forward cannot run in float64; its full-rank check runs in float32 against this tolerance instead.
FLOAT32_EXACT = {"raft_small": 1e-5, "raft_large": 1e-5}
DEFAULT_CACHE = Path(__file__).resolve().parent / "results" / "coverage_rows.json"

# torchvision: input 64 unless the builder needs more.
TV_SIZES = {"inception_v3": 75, "googlenet": 64}
TV_FIXED = ("vit_", "maxvit_")  # fixed positional embeddings / window partition: declared 224

# timm: (label, timm name, create_model kwargs, what it exercises). Input: 64 if the model
# accepts it, else its pretrained_cfg input size.
TIMM_MODELS: list[tuple[str, str, dict[str, Any], str]] = [
    ("mobilenetv3_small_050", "mobilenetv3_small_050", {}, "depthwise, SE"),
    ("efficientnet_b0", "efficientnet_b0", {}, "depthwise, SE"),
    ("mixnet_s", "mixnet_s", {}, "depthwise, mixed kernel sizes (MixedConv2d)"),
    ("ghostnet_100", "ghostnet_100", {}, "depthwise, ghost modules"),
    ("rexnet_100", "rexnet_100", {}, "depthwise"),
    ("tf_mobilenetv3_small_minimal_100", "tf_mobilenetv3_small_minimal_100", {}, "Conv2dSame (dynamic 'same' padding)"),
    ("efficientnet_cc_b0_4e", "efficientnet_cc_b0_4e", {}, "CondConv2d (per-sample expert kernels)"),
    ("regnetx_002", "regnetx_002", {}, "grouped"),
    ("resnext26ts", "resnext26ts", {}, "grouped"),
    ("ecaresnet26t", "ecaresnet26t", {}, "grouped stem, ECA (Conv1d)"),
    ("skresnet18", "skresnet18", {}, "selective kernel: grouped + dilated"),
    ("res2net50_26w_4s", "res2net50_26w_4s", {}, "split/hierarchical convs"),
    ("resnet18d_os8", "resnet18d", {"output_stride": 8}, "dilated (output_stride=8)"),
    ("dla34", "dla34", {}, "deep layer aggregation"),
    ("hrnet_w18_small", "hrnet_w18_small", {}, "multi-resolution branches"),
    ("dpn68", "dpn68", {}, "dual path, grouped"),
    ("cspresnet50", "cspresnet50", {}, "cross-stage partial"),
    ("selecsls42b", "selecsls42b", {}, "SelecSLS"),
    ("ese_vovnet19b_dw", "ese_vovnet19b_dw", {}, "VoVNet, depthwise, eSE"),
    ("repvgg_a0", "repvgg_a0", {}, "RepVGG (multi-branch, eval)"),
    ("tresnet_m", "tresnet_m", {}, "space-to-depth, anti-aliasing"),
    ("nf_resnet26", "nf_resnet26", {}, "ScaledStdConv2d (weight standardisation in forward)"),
    ("resnetv2_50x1_bit", "resnetv2_50x1_bit", {}, "StdConv2d (weight standardisation in forward)"),
    ("convnext_atto", "convnext_atto", {}, "ConvNeXt (depthwise 7x7, layer scale)"),
    ("poolformer_s12", "poolformer_s12", {}, "MetaFormer (pooling mixer)"),
    ("edgenext_xx_small", "edgenext_xx_small", {}, "hybrid: conv + transposed attention"),
    ("mobilevit_xxs", "mobilevit_xxs", {}, "hybrid: MobileViT"),
    ("efficientformer_l1", "efficientformer_l1", {}, "hybrid: EfficientFormer (attention bias)"),
    ("fastvit_t8", "fastvit_t8", {}, "hybrid: FastViT (reparam, RepMixer)"),
    ("levit_128s", "levit_128s", {}, "hybrid: LeViT (conv stem + attention)"),
    ("convit_tiny", "convit_tiny", {}, "attention: ConViT (gated positional attention)"),
    ("coatnet_nano_rw_224", "coatnet_nano_rw_224", {}, "hybrid: CoAtNet (MBConv + rel-pos attention)"),
    ("maxvit_nano_rw_256", "maxvit_nano_rw_256", {}, "hybrid: MaxViT (block/grid attention)"),
    ("botnet26t_256", "botnet26t_256", {}, "hybrid: ResNet + self-attention"),
]
TIMM_BY_LABEL = {t[0]: t for t in TIMM_MODELS}


# convnd: hand-built models of the conv types torchvision's classifiers do not use
# (torchaudio is not installed): Conv1d over waveforms and sequences, transposed-conv decoders, Conv3d.
def m5_audio() -> nn.Module:
    """M5 (Dai et al. 2017): a raw-waveform classifier, 1-d convs with a long strided first kernel."""
    def block(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv1d(cin, cout, k, stride=stride), nn.BatchNorm1d(cout), nn.ReLU(), nn.MaxPool1d(4)]
    return nn.Sequential(*block(1, 128, 80, 4), *block(128, 128, 3), *block(128, 256, 3), *block(256, 512, 3),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(512, 35))


class TCN(nn.Module):
    """A temporal conv net: residual blocks of dilated causal Conv1d (left padding), 1x1 skips."""

    def __init__(self, cin: int = 40, width: int = 96, levels: int = 5, classes: int = 12) -> None:
        super().__init__()
        self.inp = nn.Conv1d(cin, width, 1)
        self.pads = [2 * 2 ** i for i in range(levels)]
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, dilation=2 ** i) for i in range(levels))
        self.mix = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(levels))
        self.norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(levels))
        self.head = nn.Conv1d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for pad, conv, mix, norm in zip(self.pads, self.convs, self.mix, self.norms):
            h = h + mix(torch.relu(norm(conv(nn.functional.pad(h, (pad, 0))))))
        return self.head(h).mean(-1)


def dcgan_generator(nz: int = 100, ngf: int = 64) -> nn.Module:
    """The DCGAN generator (Radford et al. 2016): ConvTranspose2d from a 1x1 latent to 64x64 RGB."""
    def up(cin: int, cout: int, stride: int, pad: int) -> list[nn.Module]:
        return [nn.ConvTranspose2d(cin, cout, 4, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*up(nz, ngf * 8, 1, 0), *up(ngf * 8, ngf * 4, 2, 1), *up(ngf * 4, ngf * 2, 2, 1),
                         *up(ngf * 2, ngf, 2, 1), nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh())


class ConvAutoencoder(nn.Module):
    """An image autoencoder: strided conv encoder, ConvTranspose2d decoder with output padding."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(128, 64, 3, 2, 1, output_padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(32, 3, 3, 2, 1, output_padding=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class VolumeUNet(nn.Module):
    """A small 3-d encoder-decoder (Conv3d down, ConvTranspose3d up, skip concatenation)."""

    def __init__(self, cin: int = 1, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv3d(cin, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU())
        self.e2 = nn.Sequential(nn.Conv3d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm3d(2 * width),
                                nn.ReLU(), nn.Conv3d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose3d(2 * width, width, 2, stride=2)
        self.d1 = nn.Sequential(nn.Conv3d(2 * width, width, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
                                nn.Conv3d(width, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        return self.d1(torch.cat([a, self.up(self.e2(a))], 1))


# name -> (builder, example input shape, what it exercises)
CONVND_MODELS: dict[str, tuple[Any, tuple[int, ...], str]] = {
    "m5_audio": (m5_audio, (1, 1, 8000), "Conv1d: raw waveform, 80-tap strided first kernel"),
    "tcn": (TCN, (1, 40, 200), "Conv1d: dilated causal (left-padded) residual blocks, 1x1 mixes"),
    "dcgan_generator": (dcgan_generator, (1, 100, 1, 1), "ConvTranspose2d decoder (1x1 latent to 64x64)"),
    "conv_autoencoder": (ConvAutoencoder, (1, 3, 64, 64), "Conv2d encoder, ConvTranspose2d with output_padding"),
    "volume_unet": (VolumeUNet, (1, 1, 16, 16, 16), "Conv3d + ConvTranspose3d, replicate padding, skip concat"),
}

# tasks: every torchvision segmentation, detection (keypoint included), video and optical-flow builder.
# name -> (module, builder kwargs beyond weights=None, example input, what it exercises). Detection inputs are
# one image (a list, as the detectors take it); the R-CNN, RetinaNet and FCOS transforms are told to resize to
# 64-80 px instead of 800-1333 so that a float64 run stays fast; SSD and SSDlite resize to their fixed 300 / 320.
# Score thresholds are 0 so that the exactness check compares non-empty boxes, scores and labels.
_DET = ("detection", {"min_size": 64, "max_size": 80})
_IMG = ("images", (3, 60, 80))
TASK_MODELS: dict[str, tuple[str, dict[str, Any], tuple[str, tuple[int, ...]], str]] = {
    "deeplabv3_mobilenet_v3_large": ("segmentation", {}, ("tensor", (1, 3, 64, 64)), "segmentation, dilated"),
    "deeplabv3_resnet50": ("segmentation", {}, ("tensor", (1, 3, 64, 64)), "segmentation, ASPP"),
    "deeplabv3_resnet101": ("segmentation", {}, ("tensor", (1, 3, 64, 64)), "segmentation, ASPP"),
    "fcn_resnet50": ("segmentation", {}, ("tensor", (1, 3, 64, 64)), "segmentation"),
    "fcn_resnet101": ("segmentation", {}, ("tensor", (1, 3, 64, 64)), "segmentation"),
    "lraspp_mobilenet_v3_large": ("segmentation", {}, ("tensor", (1, 3, 64, 64)), "segmentation"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (_DET[0], {**_DET[1], "box_score_thresh": 0.0}, _IMG, "two-stage"),
    "fasterrcnn_mobilenet_v3_large_fpn": (_DET[0], {**_DET[1], "box_score_thresh": 0.0}, _IMG, "two-stage"),
    "fasterrcnn_resnet50_fpn": (_DET[0], {**_DET[1], "box_score_thresh": 0.0}, _IMG, "two-stage"),
    "fasterrcnn_resnet50_fpn_v2": (_DET[0], {**_DET[1], "box_score_thresh": 0.0}, _IMG, "two-stage, conv box head"),
    "fcos_resnet50_fpn": (_DET[0], {**_DET[1], "score_thresh": 0.0}, _IMG, "one-stage, anchor-free"),
    "keypointrcnn_resnet50_fpn": (_DET[0], {**_DET[1], "box_score_thresh": 0.0}, _IMG, "keypoints"),
    "maskrcnn_resnet50_fpn": (_DET[0], {**_DET[1], "box_score_thresh": 0.0}, _IMG, "instance masks"),
    "maskrcnn_resnet50_fpn_v2": (_DET[0], {**_DET[1], "box_score_thresh": 0.0}, _IMG, "instance masks"),
    "retinanet_resnet50_fpn": (_DET[0], {**_DET[1], "score_thresh": 0.0}, _IMG, "one-stage"),
    "retinanet_resnet50_fpn_v2": (_DET[0], {**_DET[1], "score_thresh": 0.0}, _IMG, "one-stage, GroupNorm head"),
    "ssd300_vgg16": (_DET[0], {"score_thresh": 0.0}, _IMG, "one-stage, resizes to 300x300"),
    "ssdlite320_mobilenet_v3_large": (_DET[0], {"score_thresh": 0.0}, _IMG, "one-stage, resizes to 320x320"),
    "mc3_18": ("video", {}, ("tensor", (1, 3, 4, 32, 32)), "Conv3d + Conv2d (mixed)"),
    "r2plus1d_18": ("video", {}, ("tensor", (1, 3, 4, 32, 32)), "(2+1)-d Conv3d"),
    "r3d_18": ("video", {}, ("tensor", (1, 3, 4, 32, 32)), "Conv3d"),
    "s3d": ("video", {}, ("tensor", (1, 3, 16, 224, 224)), "separable Conv3d, final 2x7x7 pooling: fixed input"),
    "mvit_v1_b": ("video", {}, ("tensor", (1, 3, 16, 224, 224)), "attention with Conv3d pooling, fixed input"),
    "mvit_v2_s": ("video", {}, ("tensor", (1, 3, 16, 224, 224)), "attention with Conv3d pooling, fixed input"),
    "swin3d_t": ("video", {}, ("tensor", (1, 3, 8, 64, 64)), "window attention, Conv3d patch embedding"),
    "swin3d_s": ("video", {}, ("tensor", (1, 3, 8, 64, 64)), "window attention, Conv3d patch embedding"),
    "swin3d_b": ("video", {}, ("tensor", (1, 3, 8, 64, 64)), "window attention, Conv3d patch embedding"),
    "raft_small": ("optical_flow", {}, ("pair", (1, 3, 128, 128)), "two images, 12 recurrent updates"),
    "raft_large": ("optical_flow", {}, ("pair", (1, 3, 128, 128)), "two images, 12 recurrent updates"),
}


def task_inputs(name: str, batch: int = 1, seed: int = 1) -> tuple[Any, ...]:
    """The positional arguments a task model takes (random, seeded): ``batch`` images, clips or pairs."""
    kind, shape = TASK_MODELS[name][2]
    g = torch.Generator().manual_seed(seed)
    if kind == "images":
        return ([torch.rand(shape, generator=g) for _ in range(batch)],)
    shape = (batch, *shape[1:])
    if kind == "pair":
        return (torch.rand(shape, generator=g), torch.rand(shape, generator=g))
    return (torch.randn(shape, generator=g),)


def bn_from_example(model: nn.Module, name: str) -> bool:
    """Random-init BatchNorm statistics estimated on two inputs like the example (BN layers in train mode).

    Why: with BN at its initial identity statistics, a random-init detector's activations vanish through the
    backbone and every box scores alike; the full-rank check would compare ties whose order is arbitrary. Two
    inputs, because a BN after a global pooling has one value per channel and sample.
    """
    args = task_inputs(name, batch=2, seed=2)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(*args)
    model.eval()
    return bool(bns)


COLS = ["model", "input", "status", "trace", "convs", "factorized", "skipped", "exact", "vbmf", "target_0.5",
        "seconds", "peak_gb"]
TASK_COLS = ["model", "input", "status", "trace", "convs", "factorized", "skipped", "exact", "target_0.5", "seconds",
             "peak_gb"]


def machine() -> str:
    return (f"{platform.machine()} CPU ({os.cpu_count()} cores), {torch.get_num_threads()} threads, niceness "
            f"{os.nice(0)}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, torch {torch.__version__}")


def suite_names(suite: str) -> list[str]:
    if suite == "timm":
        return [t[0] for t in TIMM_MODELS]
    if suite == "convnd":
        return list(CONVND_MODELS)
    if suite == "tasks":
        return sorted(TASK_MODELS, key=lambda n: (TASK_MODELS[n][0], n))
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _tv_size(name: str) -> int:
    if name.startswith(TV_FIXED):
        return 224
    return TV_SIZES.get(name, 64)


def _build(suite: str, name: str) -> tuple[nn.Module, int, str]:
    """(model in eval mode, input side, note); convnd models take the shape in CONVND_MODELS."""
    if suite == "convnd":
        return CONVND_MODELS[name][0]().eval(), 0, ""
    if suite == "tasks":
        module, kw, _, _ = TASK_MODELS[name]
        if module in ("segmentation", "detection"):
            kw = {"weights_backbone": None, **kw}
        return torchvision.models.get_model(name, weights=None, **kw).eval(), 0, ""
    if suite == "torchvision":
        kw = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        return torchvision.models.get_model(name, weights=None, **kw).eval(), _tv_size(name), ""
    import timm  # optional dependency

    _, timm_name, kw, _ = TIMM_BY_LABEL[name]
    model = timm.create_model(timm_name, pretrained=False, **kw).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    declared = int(cfg.get("input_size", (3, 224, 224))[-1])
    if cfg.get("fixed_input_size", False):
        return model, declared, f"fixed input {declared}"
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        return model, 64, ""
    except Exception as err:  # noqa: BLE001 - the model does not take 64x64: use its declared size
        return model, declared, f"64x64 rejected by eager model ({type(err).__name__}), declared input {declared}"


def _redraw_zero_weights(model: nn.Module) -> list[str]:
    """Re-draw weight tensors initialised to exactly zero (they would hide mismatches)."""
    names = []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0 or n.endswith("bias") or bool(p.abs().max() > 0):
                continue
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            names.append(n)
    return names


def _args(x: Any) -> tuple[Any, ...]:
    """The positional arguments: a tasks model's tuple, or the one input tensor of the other suites."""
    return x if isinstance(x, tuple) else (x,)


def _to(x: Any, dtype: torch.dtype) -> Any:
    """``x`` (a tensor, or tuples and lists of them) with its floating tensors in ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    return type(x)(_to(v, dtype) for v in x)


def _shape_label(x: Any) -> str:
    """An input as the table writes it: ``[3x60x80]`` for a list of one image, shapes joined by ``, ``."""
    if isinstance(x, torch.Tensor):
        return "x".join(map(str, x.shape))
    inner = ", ".join(_shape_label(v) for v in x)
    return f"[{inner}]" if isinstance(x, list) else inner


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    return []


def _rel_err(ref: Any, out: Any) -> float | None:
    r, o = _outputs(ref), _outputs(out)
    if not r or len(r) != len(o) or any(a.shape != b.shape for a, b in zip(r, o)):
        return float("inf")
    r, o = [t.double() for t in r if t.numel()], [t.double() for t in o if t.numel()]
    scale = max((float(t.abs().max()) for t in r), default=0.0)
    if scale == 0.0:
        return None  # vacuous: the reference output is identically zero (or empty)
    return max(float((a - b).abs().max()) for a, b in zip(r, o)) / scale


class _Done(Exception):
    """Early exit from run_one with a complete row."""


def run_one(suite: str, name: str, size: int | None = None, lean: bool = False,
            exact_only: bool = False) -> dict[str, Any]:
    """One row. ``lean``: take the reference output first and compress in place (no model copies),
    rebuilding the model (same seed) for the float32 runs; for models near the memory limit."""
    row: dict[str, Any] = {"model": name, "suite": suite}
    t0 = time.perf_counter()
    notes: list[str] = []
    try:
        torch.manual_seed(0)
        model, default_size, note = _build(suite, name)
        if note:
            notes.append(note)
        size = size or default_size
        row["input"] = size
        redrawn = _redraw_zero_weights(model)
        if redrawn:
            notes.append(f"re-drew {len(redrawn)} zero-initialised weight tensor(s): {', '.join(redrawn[:3])}"
                         + (", ..." if len(redrawn) > 3 else ""))
        if suite == "tasks":
            x: Any = task_inputs(name)
            if bn_from_example(model, name):
                notes.append("BatchNorm statistics estimated on two inputs like the example (random init)")
            row["input"] = _shape_label(x)
        else:
            x = torch.randn(CONVND_MODELS[name][1] if suite == "convnd" else (1, 3, size, size))
        if suite == "convnd":
            row["input"] = "x".join(map(str, x.shape))
        row["convs"] = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        in_float32 = suite == "tasks" and name in FLOAT32_EXACT
        tol = FLOAT32_EXACT[name] if in_float32 else TOL
        if in_float32:
            notes.append(f"full-rank check in float32 at tolerance {tol:g}: the forward builds float32 grids "
                         "and cannot run in float64")
            model64, x64 = copy.deepcopy(model), x
        else:
            if suite == "tasks":  # some task models build tensors in the default dtype
                torch.set_default_dtype(torch.float64)
            model64, x64 = model.double(), _to(x, torch.float64)
        if lean:
            notes.append("lean mode: reference output taken first, compressed in place, model rebuilt (same seed) "
                         "for the float32 runs")
            with torch.no_grad():
                ref = model64(*_args(x64))
        gm = convfx.compress(model64, x64, method="tucker", rank=1.0, progress=False, inplace=lean)
        rep = gm.convfx_report
        parts = getattr(gm, "convfx_parts", None)
        if parts:
            row["trace"] = f"root untraceable: {len(parts['parts'])} part(s)"
            row["parts"] = [p["path"] for p in parts["parts"]]
        else:
            row["trace"] = "ok" + (" (leaf fallbacks)" if rep.notes else "")
        if rep.notes:
            notes.extend(rep.notes)
        row["factorized"] = len(rep.factorized)
        # One reason per kind: drop parenthesised details and quoted layer names.
        reasons = collections.Counter(re.sub(r"'[\w\-]*\.[\w.\-]*'", "'…'", (r.skipped or "").split(" (")[0])
                                      for r in rep.skipped)
        row["skipped"] = "; ".join(f"{n} {k}" for k, n in reasons.most_common())
        with torch.no_grad():
            if not lean:
                ref = model64(*_args(x64))
            out = gm(*_args(x64))
        err = _rel_err(ref, out)
        row["rel_err"] = err
        print(f"   {name}: full rank {'float32' if in_float32 else 'float64'} rel err {err}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        if err is None:
            row["exact"] = "vacuous (zero output)"
        else:
            row["exact"] = "yes" if err < tol else f"NO ({err:.1e})"
        del gm, ref, out, model64, x64
        gc.collect()
        torch.set_default_dtype(torch.float32)
        if exact_only or suite == "tasks":
            row["vbmf"] = "not run (--exact-only)" if exact_only else "-"
        if exact_only:
            row["target_0.5"] = "not run (--exact-only)"
            row["status"] = "ok"
            raise _Done
        if lean:
            del model
            gc.collect()

        def model32() -> nn.Module:
            if not lean:
                return model.float()
            torch.manual_seed(0)
            fresh = _build(suite, name)[0]
            _redraw_zero_weights(fresh)
            return fresh

        if suite != "tasks":  # the tasks suite checks the budget alone (2 cores, large models)
            g1 = convfx.compress(model32(), x, rank="vbmf", progress=False, inplace=lean)
            row["vbmf"] = f"{g1.convfx_report.conv_reduction:.2f}x"
            print(f"   {name}: vbmf {row['vbmf']}, {time.perf_counter() - t0:.0f} s", flush=True)
            del g1
            gc.collect()
        try:
            g2 = convfx.compress(model32(), x, flops_target=0.5, progress=False, inplace=lean)
            rep2 = g2.convfx_report
            row["target_0.5"] = f"{rep2.conv_reduction:.2f}x"
            if suite == "tasks":
                summary = rep2.to_table(max_rows=0).split("\n\n", 1)[1]  # totals, convention, notes
                row["report"] = re.sub(r"\nskipped:(\n  [^\n]*)*", "", summary)  # the rows say why
                with torch.no_grad():  # the compressed model still runs on the example input
                    _outputs(g2(*_args(x)))
            del g2
        except ValueError as err:  # the documented answer when skipped convs alone exceed the budget
            if not str(err).startswith("flops_target: unreachable"):
                raise
            row["target_0.5"] = "unreachable"
            notes.append(f"flops_target=0.5 raised ValueError: {str(err).splitlines()[0]}")
        row["status"] = "ok"
    except _Done:
        pass
    except convfx.ConvfxError as err:
        where = getattr(err, "where", None)
        row["status"] = ("refused: " if where else "refused (no module named): ") + str(err).splitlines()[0][:160]
    except Exception as err:  # noqa: BLE001 - a convfx bug: record it, keep going
        msg = str(err).splitlines()[0][:160] if str(err) else ""
        row["status"] = f"FAILED {type(err).__name__}: {msg}"
        row["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
    torch.set_default_dtype(torch.float32)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
    row["notes"] = notes
    row["machine"] = machine()
    return row


def run_isolated(suite: str, name: str, size: int | None, threads: int, timeout: float,
                 lean: bool = False, exact_only: bool = False) -> dict[str, Any]:
    """run_one in a child process; a crash, kill or timeout becomes a 'not run' row."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "row.json"
        cmd = [sys.executable, __file__, "--suite", suite, "--one", name, "--row-out", str(out),
               "--threads", str(threads)] + (["--size", str(size)] if size else []) + (["--lean"] if lean else []) \
        + (["--exact-only"] if exact_only else [])
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"model": name, "suite": suite, "status": f"not run: timed out after {timeout:.0f} s",
                    "seconds": round(time.perf_counter() - t0, 1), "notes": []}
        if out.exists():
            return json.loads(out.read_text())
        why = f"killed by signal {-rc}" + (" (likely out of memory)" if rc == -signal.SIGKILL else "") \
            if rc < 0 else f"child exited {rc} without a row"
        return {"model": name, "suite": suite, "status": f"not run: {why}",
                "seconds": round(time.perf_counter() - t0, 1), "notes": []}


# ---------------------------------------------------------------------------------------- cache

def load_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {"runs": [], "rows": {}}
    return json.loads(path.read_text())


def update_cache(path: Path | None, cache: dict[str, Any], key: str | None = None,
                 row: dict[str, Any] | None = None, run: dict[str, Any] | None = None) -> None:
    """Add a row / run to ``cache`` and merge it into the file (other sweeps may write it too)."""
    if key is not None:
        cache["rows"][key] = row
    if run is not None:
        cache["runs"].append(run)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"convfx_{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = load_cache(path)
        if key is not None:
            disk["rows"][key] = row
        if run is not None:
            disk["runs"].append(run)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(disk, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    cache.update(disk)


def _key(suite: str, name: str) -> str:
    return f"{suite}:{name}"


# ------------------------------------------------------------------------------------- markdown

def classify(row: dict[str, Any]) -> str:
    s = str(row.get("status", ""))
    if s == "ok":
        return "mismatch" if str(row.get("exact", "")).startswith("NO") else "ok"
    if s.startswith("refused"):
        return "refused"
    if s.startswith("not run"):
        return "not run"
    return "failed"


def summary_line(rows: list[dict[str, Any]]) -> str:
    c = collections.Counter(classify(r) for r in rows)
    vacuous = sum(str(r.get("exact", "")).startswith("vacuous") for r in rows)
    unnamed = sum(str(r.get("status", "")).startswith("refused (no module") for r in rows)
    s = (f"{len(rows)} models: {c['ok']} compressed exactly at full rank, {c['mismatch']} full-rank mismatches, "
         f"{c['refused']} refused with ConvfxError, {c['failed']} failed otherwise, {c['not run']} not run")
    if vacuous or unnamed:
        s += f" ({vacuous} vacuous exactness checks, {unnamed} refusals not naming a module)"
    if any(r.get("suite") == "tasks" for r in rows):
        halved = sum(_reduction(r) >= 1.995 for r in rows)
        parts = sum(bool(r.get("parts")) for r in rows)
        s += (f"; {halved} compressed to 2x fewer conv MACs at flops_target=0.5; {parts} compressed part by part "
              "(root untraceable)")
    return s + "."


def _reduction(row: dict[str, Any]) -> float:
    try:
        return float(str(row.get("target_0.5", "")).rstrip("x"))
    except ValueError:
        return 0.0


def _cell(row: dict[str, Any], col: str) -> str:
    v = row.get(col, "-")
    if col == "model" and row.get("imported"):
        v = f"{v} †"
    if col == "model" and row.get("notes"):
        v = f"{v} [^{row['_fn']}]"
    return str(v).replace("|", "\\|")


def render(suite: str, rows: list[dict[str, Any]], missing: list[str], cache: dict[str, Any],
           cache_path: Path | None, cmd: str) -> str:
    title = {"torchvision": "torchvision classification models", "timm": "timm models (random init)",
             "convnd": "hand-built Conv1d / Conv3d / ConvTranspose models (random init)",
             "tasks": "torchvision segmentation, detection, keypoint, video and optical-flow models (random init)"}[suite]
    try:
        import timm
        versions = f", timm {timm.__version__}"
    except ImportError:
        versions = ""
    if suite == "torchvision":
        inputs = ("input 1x3xSxS with S=64 (224 for ViT and MaxViT: fixed positional embeddings / window "
                  "partition; 75 for Inception-v3)")
    elif suite == "convnd":
        inputs = "the models below (defined in `benchmarks/coverage.py`), input as in the table"
    elif suite == "tasks":
        inputs = ("`torchvision.models.get_model(name, weights=None[, weights_backbone=None], **kwargs)` with the kwargs "
                  "below; input as in the table (detectors: a list of one 3x60x80 image, `model([image])`; RAFT: two "
                  "images, checked at full rank in float32 to a relative 1e-5, since its forward builds float32 "
                  "coordinate grids whatever the model's dtype; the other models' float64 runs also set float64 as "
                  "the default dtype). Random-init BatchNorm statistics are estimated first on two other inputs like it (else a detector's "
                  "activations vanish and every box scores alike, so the check would compare ties). The detectors' "
                  "exactness compares every output tensor (boxes, scores, labels, masks, keypoints) in eval mode. "
                  "`target_0.5` is the conv-MAC reduction of the whole model at `flops_target=0.5` (float32, data-free), "
                  "counted on the tensors each conv saw (for the R-CNN, RetinaNet and FCOS detectors: the batch their "
                  "transform produced, 64x80 here; ROI heads: the proposals and detections of that run)")
    else:
        inputs = ("`timm.create_model(name, pretrained=False, **kwargs)`; input 1x3xSxS with S=64 if the eager "
                  "model accepts it, else its pretrained_cfg input size (always that size when "
                  "`fixed_input_size`)")
    runs: dict[str, list[str]] = {}
    for r in cache.get("runs", []):
        if r.get("suite") == suite:
            runs.setdefault(r["cmd"], []).append(r["date"])
    where = os.path.relpath(cache_path) if cache_path is not None else None
    lines = [f"# convfx coverage over {title}", "",
             f"Command{' (regenerates this file from the row cache)' if where else ''}: `{cmd}`", ""]
    if runs and where:
        lines += [(f"Rows accumulated in `{where}` by these runs (each model in its own process; a run stopped "
                   "part-way was continued by the same command, which skips cached rows):"), ""]
        lines += [f"- `{c}` ({', '.join(d)})" for c, d in runs.items()]
        lines.append("")
    if any(r.get("imported") for r in rows):
        lines += [("Rows marked † come from the previous session's in-process sweep with the earlier version of "
                   "this script (before the row cache; copied from its printed output). That version did not "
                   "re-draw zero-initialised weights; none of those builders has any (checked), so their "
                   "exactness checks stand."), ""]
    machines = collections.Counter(str(r.get("machine", "not recorded (imported row)")) for r in rows)
    lines += [("Machine(s), rows each: " + "; ".join(f"{m}: {n}" for m, n in machines.most_common())
               + f". Shared with other jobs. torchvision {torchvision.__version__}{versions}."), "",
              (f"Random init (`torch.manual_seed(0)`), eval mode; {inputs}. "
              "Weight tensors initialised to exactly zero are re-drawn (noted per row) so that the check is not "
              f"vacuous. Exactness: full-rank Tucker-2 (SVD for 1x1) in float64, max|diff| / max|ref| < {TOL:g} "
              "on the model output. vbmf / target_0.5: conv-MAC reduction in float32 at `rank=\"vbmf\"` and "
              "`flops_target=0.5`. seconds: all three compressions plus the checks; peak_gb: the process's peak "
              "RSS."), "", summary_line(rows), ""]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    if suite == "timm":
        lines += ["| model | exercises |", "|---|---|"]
        lines += [f"| {t[0]} | `{t[1]}`{' ' + str(t[2]) if t[2] else ''}: {t[3]} |" for t in TIMM_MODELS]
        lines.append("")
    if suite == "convnd":
        lines += ["| model | exercises |", "|---|---|"]
        lines += [f"| {name} | {what} |" for name, (_, _, what) in CONVND_MODELS.items()]
        lines.append("")
    cols = TASK_COLS if suite == "tasks" else COLS
    if suite == "tasks":
        lines += ["| model | task | kwargs | exercises | parts compressed (root untraceable) |", "|---|---|---|---|---|"]
        by_name = {r["model"]: r for r in rows}
        for name in suite_names("tasks"):
            module, kw, _, what = TASK_MODELS[name]
            if name not in by_name:
                parts = "(not in this run)"
            else:
                parts = ", ".join(f"`{p}`" for p in by_name[name].get("parts", [])) or "- (whole model traced)"
            lines.append(f"| {name} | {module} | {kw or '-'} | {what} | {parts} |")
        lines.append("")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fn = 0
    notes = []
    for r in rows:
        if r.get("notes"):
            fn += 1
            r = dict(r, _fn=fn)
            notes.append(f"[^{fn}]: {r['model']}: " + "; ".join(r["notes"]))
        lines.append("| " + " | ".join(_cell(r, c) for c in cols) + " |")
    if notes:
        lines += [""] + notes
    reports = [r for r in rows if r.get("report")]
    if reports:
        lines += ["", "## Reports at flops_target=0.5 (totals, MAC convention, parts traced and not)", ""]
        for r in reports:
            lines += [f"### {r['model']}", "", "```", r["report"].rstrip(), "```", ""]
    fails = [r for r in rows if classify(r) == "failed" and r.get("traceback")]
    if fails:
        lines += ["", "## Tracebacks of failures", ""]
        for r in fails:
            lines += [f"### {r['model']}", "", "```", r["traceback"].rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["torchvision", "timm", "convnd", "tasks"], default="torchvision")
    ap.add_argument("--models", default="", help="comma-separated subset (default: the whole suite)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="markdown to (re)write from every cached row")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="JSON row cache ('' for none)")
    ap.add_argument("--rerun", action="store_true", help="run models even if they have a cached row")
    ap.add_argument("--report-only", action="store_true", help="only regenerate --out from the cache")
    ap.add_argument("--in-process", action="store_true", help="do not isolate each model in a child process")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per model (child process)")
    ap.add_argument("--size", type=int, default=None, help="override the input side (e.g. for huge models)")
    ap.add_argument("--lean", action="store_true", help="no model copies (for models near the memory limit)")
    ap.add_argument("--exact-only", action="store_true", help="only the float64 full-rank check (huge models)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.one is not None:  # child mode
        row = run_one(args.suite, args.one, args.size, args.lean, args.exact_only)
        args.row_out.write_text(json.dumps(row))
        return 0

    cache_path = Path(args.cache) if args.cache else None
    cache = load_cache(cache_path)
    all_names = suite_names(args.suite)
    names = [m for m in args.models.split(",") if m] or all_names
    unknown = [n for n in names if n not in all_names]
    if unknown:
        ap.error(f"not in the {args.suite} suite: {', '.join(unknown)}")
    cmd = "python " + shlex.join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    if not args.report_only:
        todo = [n for n in names if args.rerun or _key(args.suite, n) not in cache["rows"]]
        if todo:
            update_cache(cache_path, cache, run={"suite": args.suite, "cmd": cmd,
                                                 "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")})
        print(f"{len(todo)} to run, {len(names) - len(todo)} cached", flush=True)
        for name in todo:
            print(f"-- {name} ...", flush=True)
            if args.in_process:
                row = run_one(args.suite, name, args.size, args.lean, args.exact_only)
            else:
                row = run_isolated(args.suite, name, args.size, args.threads, args.timeout, args.lean,
                                   args.exact_only)
            if args.size:
                row["notes"] = list(row.get("notes", [])) + [f"input overridden with --size {args.size}"]
            update_cache(cache_path, cache, _key(args.suite, name), row)
            print(" | ".join(str(row.get(c, "-")) for c in (TASK_COLS if args.suite == "tasks" else COLS)),
                  flush=True)
            if row.get("notes"):
                print("   notes: " + "; ".join(row["notes"]), flush=True)
    # The report covers every cached row of the suite (or, without a cache, what just ran).
    report_names = all_names if cache_path is not None and not args.models else names
    rows = [cache["rows"][_key(args.suite, n)] for n in report_names if _key(args.suite, n) in cache["rows"]]
    missing = [n for n in report_names if _key(args.suite, n) not in cache["rows"]]
    print(summary_line(rows), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(args.suite, rows, missing, cache, cache_path, cmd))
        print(f"wrote {args.out}", flush=True)
    bad = sum(classify(r) in ("failed", "mismatch") for r in rows)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
