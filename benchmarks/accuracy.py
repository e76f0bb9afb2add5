"""Accuracy per conv MAC: the seed method, convfx and Torch-Pruning side by side.

One script, one machine, every method at the same conv-MAC reductions:

* **seed**: the research script's Tucker-2, data-free. Its own VBMF ranks give one
  point; at the reduction targets the ranks are a uniform fraction of each layer's
  channels, bisected until the conv MACs hit the target (the issue's baseline table).
* **convfx**: Tucker-2 factors fitted to each layer's outputs on calibration images
  (``calibration=``) with ranks allocated across layers by ``flops_target=``; then
  fine-tuned with plain cross-entropy (**convfx**) or distilled (**convfx+KD**) from a
  teacher (default: the uncompressed model after the same fine-tuning budget, i.e. the
  baseline row; ``--teacher original`` distils from the pretrained checkpoint).
  ``--methods convfx+KD`` without ``convfx`` fine-tunes only the distilled variant.
  ``convfx-cp`` and ``convfx-auto`` (each also ``+KD``) use ``compress(method="cp")`` or
  ``method="auto"`` (tucker or cp chosen per layer) instead of Tucker-2; ``convfx-id`` uses
  ``method="id"`` (hidden channels of inverted-residual blocks narrowed by a data-aware
  interpolative decomposition, for EfficientNet-Lite0), ``convfx-idr`` the same with
  ``refine_steps=--refine-steps`` (each narrowed block then trained to reproduce the original
  block's output on the calibration images: local and label-free, not fine-tuning).
* **pruning**: Torch-Pruning's L1-magnitude structured channel pruning (the peer a user
  would pick), its ratio bisected to the same conv-MAC target. On the CIFAR ResNets only
  the inner channels of each block are pruned (``conv1``, ``linear`` and every block's
  ``conv2`` are ignored) because Torch-Pruning's dependency graph does not understand the
  "option A" zero-padding shortcut.

After compression every method gets BatchNorm re-estimated on the same calibration
images (top-1 "calib only"). On EfficientNet-Lite0 (300 images, where re-estimation
costs even the uncompressed model 2.5 points) the re-estimated statistics are kept only
where they bring the outputs on those images closer to the original's (``--bn auto``:
label-free, the same for every method; the note column says where they were dropped).
Then comes the same fine-tuning budget (top-1 "FT"); the uncompressed model gets that
budget too (the "baseline" row). CIFAR top-1 is on all
10,000 JPEG test images; calibration and fine-tuning use the train split only.
EfficientNet-Lite0 is calibrated on a fixed part of imagenet-val-1300 and reported on
the rest, without fine-tuning.

MACs: fvcore's count, 1 multiply-add = 1, all conv layers, per image; GFLOPs = 2 x GMACs.

    # calibration only, all models, on this CPU
    python benchmarks/accuracy.py --shared-data ../shared/data --epochs 0 --tag cpu
    # with 5 epochs of fine-tuning per point (a GPU makes this minutes, not a day)
    python benchmarks/accuracy.py --shared-data ../shared/data --models resnet20,resnet56 \\
        --epochs 5 --device cuda --tag cuda
    # a CPU grid over several sittings: each call adds the points the saved JSON lacks
    python benchmarks/accuracy.py --shared-data ../shared/data --models resnet56 --epochs 5 \\
        --targets 2 --tag cpu_ft_resnet56 --resume

Writes ``accuracy_<tag>.md``, ``.json`` and ``.png`` (top-1 vs conv MACs, one line per
method) to ``--out-dir``; the JSON is rewritten after every point, so an interrupted run
keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import convfx  # noqa: E402
from convfx import zoo  # noqa: E402
from convfx.checkpoint import atomic_save, load_checkpoint  # noqa: E402
from convfx.data import cache_dir, cifar10, imagenet, split_dataset  # noqa: E402
from convfx.train import recalibrate_bn  # noqa: E402
from passes.calibrate import output_discrepancy  # noqa: E402
from passes.recover import BN_MODES, TRAIN_SETS, DistillConfig  # noqa: E402

log = logging.getLogger("accuracy")

CIFAR_MODELS = {"resnet20": 20, "resnet56": 56}
METHODS = ("seed", "convfx", "convfx+KD", "pruning")
#: convfx with another structure than Tucker-2 (``compress(method=...)``): convfx-cp, convfx-auto, convfx-id(+KD);
#: convfx-idr is method="id" with ``refine_steps=--refine-steps``.
STRUCTURES = ("cp", "auto", "id", "idr")
#: "+D": the same compression followed by compress's label-free recovery (``distill_steps=--distill-steps``).
DISTILLED = tuple(f"{m}+D" for m in ("convfx", *(f"convfx-{s}" for s in STRUCTURES)))
ALL_METHODS = METHODS + tuple(f"convfx-{s}{kd}" for s in STRUCTURES for kd in ("", "+KD")) + DISTILLED
LABELS = {
    "seed": "seed: Tucker-2, data-free (uniform ranks; VBMF point)",
    "convfx": "convfx: data-aware Tucker-2 + flops_target",
    "convfx+KD": "convfx + distillation",
    "pruning": "Torch-Pruning (L1 magnitude, channels)",
    "convfx-cp": "convfx: data-aware CP + flops_target",
    "convfx-cp+KD": "convfx CP + distillation",
    "convfx-auto": "convfx: method=auto (tucker or cp per layer) + flops_target",
    "convfx-auto+KD": "convfx auto + distillation",
    "convfx-id": "convfx: method=id (data-aware hidden-channel ID) + flops_target",
    "convfx-id+KD": "convfx id + distillation",
    "convfx-idr": "convfx: method=id + refine_steps (each narrowed chain refined by local, label-free gradient steps)",
    "convfx-idr+KD": "convfx id refined + distillation",
    **{m: f"{m[:-2]} + label-free recovery (distill_steps)" for m in DISTILLED},
}


def structure(method: str) -> str | None:
    """The ``compress(method=)`` of a convfx row (convfx-cp+KD -> cp), None for other methods."""
    base = method.removesuffix("+KD").removesuffix("+D")
    if base == "convfx":
        return "tucker"
    return base.removeprefix("convfx-") if base.startswith("convfx-") else None


# ----------------------------------------------------------------------------- data


class ImageTensors(Dataset):
    """Decoded uint8 images held in memory, normalized per item (random crop + flip optional).

    Why: decoding 50,000 JPEGs every epoch costs more than training a ResNet-20 on a
    GPU; the bytes are decoded once (and cached) and only the cheap crop/flip runs per item.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, norm: zoo.Normalization,
                 augment: bool = False) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.padded = F.pad(images, (4, 4, 4, 4)) if augment else images
        self.mean = torch.tensor(norm.mean).view(-1, 1, 1)
        self.std = torch.tensor(norm.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.augment:
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            img = self.padded[i, :, dy:dy + 32, dx:dx + 32]
            if bool(torch.rand(()) < 0.5):
                img = img.flip(-1)
        else:
            img = self.images[i]
        return (img.float() / 255 - self.mean) / self.std, int(self.labels[i])

    def batches(self, size: int, device: torch.device, indices: torch.Tensor | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Un-augmented batches, normalized on ``device`` (for eval and calibration)."""
        idx = torch.arange(len(self)) if indices is None else indices
        mean, std = self.mean.to(device), self.std.to(device)
        for s in range(0, len(idx), size):
            j = idx[s:s + size]
            x = self.images[j].to(device, non_blocking=True).float() / 255
            yield (x - mean) / std, self.labels[j].to(device)


def decode_cifar(zip_path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N x 3 x 32 x 32, int64 labels) of a CIFAR-10 JPEG zip, cached beside its extraction."""
    from PIL import Image

    key = f"{zip_path.stat().st_size}-{int(zip_path.stat().st_mtime)}"
    cache = cache_dir() / f"cifar10-{split}-{key}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        return blob["images"], blob["labels"]
    folder = cifar10(zip_path, split)  # extracts once, ImageFolder with the standard class order
    t0 = time.perf_counter()
    images = np.empty((len(folder.samples), 32, 32, 3), np.uint8)
    for i, (path, _) in enumerate(folder.samples):
        with Image.open(path) as im:
            images[i] = np.asarray(im.convert("RGB"))
    out = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([y for _, y in folder.samples], dtype=torch.int64)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({"images": out, "labels": labels}, tmp)
    os.replace(tmp, cache)
    log.info("decoded %d %s images in %.1fs -> %s", len(labels), split, time.perf_counter() - t0, cache)
    return out, labels


# ----------------------------------------------------------------------------- methods


def conv_macs(model: nn.Module, example: torch.Tensor) -> int:
    return convfx.analyze(model, example).conv_macs


def bisect(make: Callable[[float], nn.Module], example: torch.Tensor, target_macs: float, lo: float, hi: float,
           *, increasing: bool, steps: int = 12, tol: float = 0.01) -> tuple[nn.Module, float]:
    """The model from ``make(p)`` whose conv MACs are closest to ``target_macs`` (p bisected).

    ``increasing``: whether MACs grow with p. Stops once within ``tol`` (relative).
    """
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(steps):
        p = (lo + hi) / 2
        m = make(p)
        macs = conv_macs(m, example)
        err = abs(macs / target_macs - 1)
        if best is None or err < best[0]:
            best = (err, m, p)
        if err <= tol:
            break
        if (macs > target_macs) == increasing:
            hi = p
        else:
            lo = p
    assert best is not None
    return best[1], best[2]


def cifar_ignored(model: nn.Module) -> list[nn.Module]:
    """Layers Torch-Pruning must leave alone on the option-A CIFAR ResNets (see module doc)."""
    ignored = [model.conv1, model.linear]
    for stage in (model.layer1, model.layer2, model.layer3):
        ignored += [block.conv2 for block in stage]
    return ignored


def lite_ignored(model: nn.Module) -> list[nn.Module]:
    return [model._fc]


def prune(model: nn.Module, ratio: float, example: torch.Tensor, ignored: Callable[[nn.Module], list[nn.Module]]
          ) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.MagnitudePruner(
        m, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=ignored(m),
    )
    pruner.step()
    return m


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    model: str
    method: str
    target: float | None  # conv-MAC reduction asked for (None: the method's own choice / baseline)
    conv_macs: int
    params: int
    top1_calib: float | None
    top5_calib: float | None
    top1_ft: float | None = None
    top5_ft: float | None = None
    epochs: int = 0
    compress_s: float = 0.0
    finetune_s: float = 0.0
    note: str = ""


def row_key(r: Row) -> tuple[Any, ...]:
    """The point a row measures: (model, method, target), plus the note for target-free rows."""
    return (r.model, r.method, r.target, r.note if r.target is None else "")


@dataclass
class Results:
    command: str
    machine: str
    settings: dict[str, Any]
    base_macs: dict[str, int] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        """Append ``row``, replacing a row of the same point (a re-measured or resumed one)."""
        self.rows = [r for r in self.rows if row_key(r) != row_key(row)] + [row]

    def save(self, out_dir: Path, tag: str) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"accuracy_{tag}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)


BN_POLICY: dict[str | None, str] = {
    None: "CIFAR: statistics always re-estimated; EfficientNet-Lite0: re-estimated statistics kept only where "
          "they lower the KL to the original's outputs on the calibration images (re-estimating from 300 images "
          "costs the uncompressed Lite0 2.5 points), see the note column",
    "always": "statistics always re-estimated",
    "never": "statistics never re-estimated",
    "auto": "re-estimated statistics kept only where they lower the KL to the original's outputs on the "
            "calibration images, see the note column",
}


def split_line(s: dict[str, Any]) -> str:
    """Which images the top-1 columns come from, and what the +D rows' recovery did."""
    where = s.get("split", "report")
    text = (f"Top-1 is measured on the **{where}** split"
            + (" (used to choose variants and settings; never the report images)" if where == "select"
               else " (computed once, after every choice was made on the selection split)"
               if "split" in s else "") + ".")
    if "split" in s:
        text += (f" CIFAR: {s['calib_images']} calibration and {s['select_images']} selection images from the train "
                 f"zip, report = the 10,000 test images. EfficientNet-Lite0 ({s['lite_split']} split of "
                 f"imagenet-val-1300): {s['lite_calib']} calibration images"
                 + (f", {s['lite_select']} selection, the rest report" if s["lite_split"] == "random" else
                    "; classes shuffled: half report (all their images), a quarter selection, a quarter "
                    "calibration, no class in two sets") + ".")
        loss = " + ".join(filter(None, [
            f"{s.get('distill_kl_weight', 1.0):g} x output KL (T {s['distill_temperature']})"
            if s.get("distill_kl_weight", 1.0) else "",
            f"{s.get('distill_feature_weight', 0.0):g} x relative MSE of the {s.get('distill_features')} features"
            if s.get("distill_feature_weight") else ""]))
        mixup, limit = s.get("distill_mixup") or 0, s.get("distill_max_seconds")
        text += (f" +D rows: compress(distill_steps={s['distill_steps']}), loss {loss}, lr {s['distill_lr']}, "
                 f"batch {s['distill_batch']}, BN {s['distill_bn']}, trains {s['distill_train']}, "
                 f"{s['distill_holdout']:.0%} of the calibration images held out to choose the weights "
                 f"({s.get('distill_checkpoints', 4)} checkpoints), augmentation "
                 f"{'off' if s['distill_no_augment'] else 'flips + padded crops'}"
                 f"{f', {mixup:.0%} of each batch mixup-blended' if mixup else ''}"
                 f"{f', at most {limit:g} s' if limit else ''}; BN "
                 f"re-estimation after it: {s['distill_bench_bn']}."
                 + (" Each +D row runs that recovery stage on a copy of the plain row's compressed model of the same "
                    "point (the same deterministic fit; its compress s = the fit's + the recovery's)."
                    if s.get("reuse_fit") else ""))
    return text


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown(res: Results) -> str:
    s = res.settings
    lines = [
        "# Accuracy per conv MAC: seed method vs convfx vs Torch-Pruning",
        "",
        f"Command: `{res.command}`",
        "",
        f"Machine: {res.machine}.",
        "",
        split_line(s),
        "",
        "MACs: fvcore, 1 multiply-add = 1, all convolutions, per image (GFLOPs = 2 x GMACs). "
        "Reduction = original conv MACs / compressed conv MACs. 'calib only': right after compression "
        f"and BN re-estimation on the {s['calib_images']} calibration images (no training; "
        f"{BN_POLICY[s.get('bn', 'always')]}). "
        f"'FT': after {s['epochs']} epoch(s) of fine-tuning (SGD momentum 0.9 nesterov, lr {s['lr']}, cosine, "
        f"{s['warmup']} warm-up steps, batch {s['batch_size']}, weight decay {s['weight_decay']}, "
        "random crop + flip); the baseline row is the uncompressed model with the same budget. "
        f"convfx+KD distils (alpha {s['kd_alpha']}, T {s['kd_temperature']}) from: {s['teacher_desc']}.",
        "",
    ]
    order = {m: i for i, m in enumerate(("original", "baseline", *ALL_METHODS))}
    for model in dict.fromkeys(r.model for r in res.rows):
        rows = sorted((r for r in res.rows if r.model == model),
                      key=lambda r: (order.get(r.method, 99), r.target or math.inf))
        base = res.base_macs[model]
        ft_base = next((r.top1_ft for r in rows if r.method == "baseline"), None)
        lines += [f"## {model}", "",
                  "| method | target | conv MACs | conv GFLOPs | reduction | params | top-1 calib only | top-1 FT "
                  "| FT vs baseline | top-5 calib | top-5 FT | compress s | FT s | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            gap = None if (r.top1_ft is None or ft_base is None) else r.top1_ft - ft_base
            lines.append(
                f"| {r.method} | {'–' if r.target is None else f'{r.target:g}x'} | {r.conv_macs / 1e6:.2f}M | "
                f"{2 * r.conv_macs / 1e9:.4f} | {base / max(r.conv_macs, 1):.2f}x | {r.params / 1e6:.3f}M | "
                f"{fmt(r.top1_calib)} | {fmt(r.top1_ft)} | {'–' if gap is None else f'{gap:+.2f}'} | "
                f"{fmt(r.top5_calib)} | {fmt(r.top5_ft)} | {r.compress_s:.1f} | {r.finetune_s:.0f} | {r.note} |")
        lines.append("")
    if res.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    return "\n".join(lines)


def plot(res: Results, path: Path) -> None:
    """Top-1 vs conv MACs: one column per model; top row after fine-tuning, bottom row calibration only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from convfx.plot import MAC_AXIS_LABEL

    models = list(dict.fromkeys(r.model for r in res.rows))
    has_ft = any(r.top1_ft is not None for r in res.rows)
    panels = [("top1_ft", "after fine-tuning"), ("top1_calib", "calibration only, no training")]
    panels = panels if has_ft else panels[1:]
    fig = Figure(figsize=(5.2 * len(models), 4.0 * len(panels) + 0.8), dpi=130)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), len(models), squeeze=False)
    colors = {"seed": "tab:gray", "convfx": "tab:blue", "convfx+KD": "tab:green", "pruning": "tab:red",
              "convfx-cp": "tab:cyan", "convfx-cp+KD": "tab:olive", "convfx-auto": "tab:purple",
              "convfx-auto+KD": "tab:brown", "convfx-id": "tab:orange", "convfx-id+KD": "tab:pink",
              "convfx-idr": "darkred", "convfx-idr+KD": "navy", "convfx+D": "teal", "convfx-cp+D": "gold",
              "convfx-auto+D": "magenta", "convfx-id+D": "lime", "convfx-idr+D": "black"}
    markers = {"seed": "s", "convfx": "o", "convfx+KD": "D", "pruning": "v", "convfx-cp": "^", "convfx-cp+KD": "<",
               "convfx-auto": "P", "convfx-auto+KD": "X", "convfx-id": "h", "convfx-id+KD": "p", "convfx-idr": "d",
               "convfx-idr+KD": "8", "convfx+D": "*", "convfx-cp+D": "H", "convfx-auto+D": "x", "convfx-id+D": "1",
               "convfx-idr+D": "2"}
    handles: dict[str, Any] = {}
    for row, (attr, what) in enumerate(panels):
        for col, model in enumerate(models):
            ax = axes[row][col]
            rows = [r for r in res.rows if r.model == model]
            for method in ALL_METHODS:
                base = method.removesuffix("+KD")
                if method != base and attr == "top1_calib" and any(r.method == base for r in rows):
                    continue  # the same model as convfx before fine-tuning
                xy = sorted((r.conv_macs / 1e6, getattr(r, attr)) for r in rows
                            if r.method == method and getattr(r, attr) is not None)
                if xy:
                    (h,) = ax.plot(*zip(*xy), "-", marker=markers[method], color=colors[method], markersize=5)
                    handles.setdefault(LABELS[method], h)
            for r in rows:
                if r.method == "original":
                    (h,) = ax.plot([r.conv_macs / 1e6], [r.top1_calib], "*", color="black", markersize=13)
                    handles.setdefault("original (pretrained)", h)
                if r.method == "baseline" and attr == "top1_ft" and r.top1_ft is not None:
                    h = ax.axhline(r.top1_ft, color="black", linestyle=":", linewidth=1)
                    handles.setdefault("original + the same fine-tuning (dotted)", h)
            ax.set_title(f"{model}: {what}", fontsize=9)
            ax.set_xlabel(MAC_AXIS_LABEL, fontsize=7)
            ax.set_ylabel("top-1 (%)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            ax.set_xlim(left=0)
    rows = math.ceil(len(handles) / 3)
    legend_in = 0.2 * rows + 0.15  # room below the panels' x labels, one line per legend row
    fig.set_figheight(fig.get_figheight() - 0.8 + legend_in)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=3, fontsize=7.5,
               frameon=False)
    fig.suptitle(f"Top-1 vs conv MACs ({res.machine.split(',')[0]})", fontsize=11)
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 0.97))
    tmp = path.with_name("." + path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- runner


class Bench:
    def __init__(self, args: argparse.Namespace, res: Results) -> None:
        self.a, self.res = args, res
        self.device = torch.device(args.device)
        self.t_start = time.perf_counter()
        self._ref_logits: dict[tuple[int, int], list[torch.Tensor]] = {}
        #: (model, structure, target) -> (the plain convfx row's compressed model before BN handling, its
        #: compress seconds), kept for the "+D" row of the same point (--no-reuse-fit: compress again)
        self._fitted: dict[tuple[str, str, float], tuple[nn.Module, float]] = {}

    def baseline_cache(self, model: str) -> Path:
        """Where the fine-tuned baseline (the distillation teacher) is kept for ``--resume``."""
        keys = {k: self.res.settings.get(k) for k in RESUME_SETTINGS}
        digest = hashlib.sha256(json.dumps([model, self.a.device, keys], sort_keys=True).encode()).hexdigest()[:12]
        return cache_dir() / "accuracy" / f"{model}-baseline-{digest}.pt"

    def have(self, model: str, method: str, target: float | None) -> bool:
        """Whether a (resumed) row already measures this point, fine-tuned when epochs > 0."""
        return any(r.model == model and r.method == method and r.target == target
                   and (self.a.epochs == 0 or r.top1_ft is not None or method == "original")
                   for r in self.res.rows)

    def over_budget(self) -> bool:
        return self.a.time_budget is not None and time.perf_counter() - self.t_start > self.a.time_budget

    def flush(self) -> None:
        self.res.save(self.a.out_dir, self.a.tag)
        (self.a.out_dir / f"accuracy_{self.a.tag}.md").write_text(markdown(self.res))
        if self.res.rows:
            plot(self.res, self.a.out_dir / f"accuracy_{self.a.tag}.png")

    def evaluate(self, model: nn.Module, batches: Callable[[], Iterator[Any]]) -> dict[str, float]:
        return convfx.evaluate(model.to(self.device), batches(), progress=False)

    def calib_kl(self, model: nn.Module, original: nn.Module, calib: list[torch.Tensor]) -> float:
        """Mean KL(original || model) of the softmax outputs on the calibration images (no labels)."""
        key = id(original), id(calib)
        if key not in self._ref_logits:
            with torch.no_grad():
                self._ref_logits = {key: [original.eval()(x) for x in calib]}
        model.eval()
        with torch.no_grad():
            total = sum(output_discrepancy(model(x), ref) * x.shape[0]
                        for x, ref in zip(calib, self._ref_logits[key]))
        return total / sum(x.shape[0] for x in calib)

    def distill_options(self) -> dict[str, Any]:
        """compress's recovery settings for the "+D" rows, from the --distill-* arguments."""
        a = self.a
        settings = {name: getattr(a, arg) for arg, name in DISTILL_ARGS.items()}
        settings["max_seconds"] = a.distill_max_seconds
        if settings["features"] != "penultimate":
            settings["features"] = tuple(settings["features"].split(","))
        return {"distill_steps": a.distill_steps, "distill_holdout": a.distill_holdout,
                "distill_augment": None if a.distill_no_augment else "default",
                "distill_settings": settings}

    def reusable(self, name: str, method: str, how: str, target: float) -> bool:
        return method.endswith("+D") and self.a.reuse_fit and (name, how, target) in self._fitted

    def recover_copy(self, model: nn.Module, original: nn.Module, calib: list[torch.Tensor]) -> str:
        """compress's recovery stage (``passes.pipeline.recover``) on a copy of the plain row's compressed model.

        Why: the fit before the recovery stage is deterministic and identical for the plain and the
        "+D" row of a point, and costs minutes on the 2-core CPU (ResNet-56 CP, Lite0 id); the +D row
        then runs only what ``distill_steps`` adds, on exactly the plain row's model (a paired
        comparison). Same split of the calibration images (the last ``distill_holdout`` held out),
        same teacher (the original), same settings as ``compress(..., distill_steps=...)``.
        """
        from passes.pipeline import _split_images
        from passes.recover import distill

        o = convfx.CompressOptions(calibration=calib, **self.distill_options())
        n = sum(int(x.shape[0]) for x in calib)
        n_held = int(round(o.distill_holdout * n)) if n > 1 else 0
        train, held = _split_images(calib, n - n_held)
        result = distill(model, original, train, o.distill_config, progress=o.progress and self.a.progress,
                         held_out=held or None)
        return (result.note() + (f" ({n - n_held} calibration images trained on, {n_held} held out to choose the "
                                 "weights)" if n_held else "") + "; recovery run on a copy of the plain row's fit")

    def bn_policy(self, model_name: str) -> str:
        return self.a.bn or ("auto" if model_name == "efficientnet_lite0" else "always")

    def reestimate_bn(self, model: nn.Module, original: nn.Module, calib: list[torch.Tensor],
                      policy: str) -> str:
        """Re-estimate BN on the calibration images; keep it only where it helps there.

        Why: data-free methods leave BN statistics stale, and re-estimation fixes them; a
        calibrated fit already reproduces the original activations, and re-estimating
        from a few hundred images can then cost accuracy (EfficientNet-Lite0 loses 2.5
        points from it even uncompressed). The rule looks only at the calibration images
        and the original model's outputs on them, never at labels or test data, and is
        the same for every method. Returns a note when the statistics were kept.
        """
        if policy == "never":
            return "BN statistics kept"
        before = self.calib_kl(model, original, calib) if policy == "auto" else math.inf
        saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
        recalibrate_bn(model, calib, len(calib))
        if policy == "always":
            return ""
        after = self.calib_kl(model, original, calib)
        if after <= before:
            return ""
        model.load_state_dict(saved, strict=False)
        return f"BN statistics kept (re-estimation raised calibration KL {before:.3f} -> {after:.3f})"

    def point(self, name: str, method: str, target: float, original: nn.Module, example: torch.Tensor,
              base_macs: int, calib: list[torch.Tensor], ignored: Callable[[nn.Module], list[nn.Module]],
              test_batches: Callable[[], Iterator[Any]]) -> tuple[nn.Module, Row] | None:
        """Compress by one method to one conv-MAC reduction, re-estimate BN, evaluate (no training).

        A failure is logged and listed in the notes (None is returned): the table says what failed.
        """
        t0 = time.perf_counter()
        target_macs = base_macs / target
        note = ""
        try:
            if method == "seed":
                model, p = bisect(lambda f: convfx.compress(original, example, method="tucker", rank=f,
                                                            progress=False),
                                  example, target_macs, 0.02, 1.0, increasing=True)
                note = f"uniform rank fraction {p:.3f}"
            elif (how := structure(method)) is not None and self.reusable(name, method, how, target):
                fitted, fit_s = self._fitted.pop((name, how, target))
                model = copy.deepcopy(fitted)
                note = self.recover_copy(model, original, calib)
                t0 -= fit_s  # the +D row's compress time: the same fit + the recovery stage
            elif (how := structure(method)) is not None:
                steps = self.a.refine_steps if how == "idr" else 0
                options = convfx.CompressOptions(
                    method="id" if how == "idr" else how, flops_target=1 / target, calibration=calib,
                    refine_steps=steps, progress=self.a.progress, **(self.distill_options() if method.endswith("+D")
                                                                      else {}))
                model = convfx.api.compress_with(original, example, options)
                if f"{method}+D" in self.a.methods and self.a.reuse_fit:
                    self._fitted[(name, how, target)] = (copy.deepcopy(model), time.perf_counter() - t0)
                kept = [n.rsplit("kept ", 1)[1] for n in model.convfx_report.notes if "; kept " in n]
                note = f"allocation: {kept[0]} sensitivities" if kept else f"refine_steps {steps}" if steps else ""
                note = "; ".join(filter(None, [note, *(n for n in model.convfx_report.notes
                                                       if n.startswith("distill: "))]))
            else:
                model, p = bisect(lambda r: prune(original, r, example, ignored), example, target_macs,
                                  0.0, 0.95, increasing=False)
                note = f"pruning ratio {p:.3f}"
        except Exception as exc:
            log.exception("%s %s at %sx failed", name, method, target)
            self.res.notes.append(f"{name} {method} at {target}x failed: {type(exc).__name__}: {exc}")
            self.flush()
            return None
        policy = self.a.distill_bench_bn if method.endswith("+D") else self.bn_policy(name)
        bn_note = self.reestimate_bn(model, original, calib, policy)
        note = "; ".join(n for n in (note, bn_note) if n)
        comp_s = time.perf_counter() - t0
        ev = self.evaluate(model, test_batches)
        macs = conv_macs(model, example)
        log.info("%s %s %.2fx: %.2fx actual, calibration-only top-1 %.2f", name, method, target,
                 base_macs / macs, ev["top1"])
        return model, Row(name, method, target, macs, sum(q.numel() for q in model.parameters()), ev["top1"],
                          ev["top5"], compress_s=comp_s, note=note)

    # -- CIFAR ------------------------------------------------------------------

    def cifar(self, name: str) -> None:
        a = self.a
        depth = CIFAR_MODELS[name]
        jpeg = a.shared_data / "cifar10-jpeg"
        ckpt = a.shared_data / "cifar10-resnet" / {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}[depth]
        original = zoo.cifar_resnet(depth, checkpoint=ckpt).eval()
        norm = zoo.normalization_of(original)
        tr_x, tr_y = decode_cifar(jpeg / "train.zip", "train")
        te_x, te_y = decode_cifar(jpeg / "test.zip", "test")
        train = ImageTensors(tr_x, tr_y, norm, augment=True)
        test = ImageTensors(te_x, te_y, norm)
        plain_train = ImageTensors(tr_x, tr_y, norm)
        order = torch.randperm(len(tr_y), generator=torch.Generator().manual_seed(0))
        calib_idx = order[:a.calib_images]
        select_idx = order[a.calib_images:a.calib_images + a.select_images]  # disjoint from calibration
        calib = [x for x, _ in plain_train.batches(100, self.device, calib_idx)]
        loader = DataLoader(train, batch_size=a.batch_size, shuffle=True, num_workers=a.workers,
                            pin_memory=self.device.type == "cuda", drop_last=True,
                            persistent_workers=False)
        example = torch.zeros(1, 3, 32, 32, device=self.device)
        original = original.to(self.device)
        base_macs = conv_macs(original, example)
        self.res.base_macs[name] = base_macs
        log.info("%s: %d conv MACs, %d train / %d test / %d calibration images; reporting on the %s split",
                 name, base_macs, len(train), len(test), len(calib_idx), a.split)

        def test_batches() -> Iterator[Any]:
            if a.split == "select":  # choosing variants: train images never calibrated on, never the test set
                return plain_train.batches(1000, self.device, select_idx)
            return test.batches(1000, self.device)

        ev = self.evaluate(original, test_batches)
        params = sum(p.numel() for p in original.parameters())
        self.res.add(Row(name, "original", None, base_macs, params, ev["top1"], ev["top5"]))
        self.flush()

        def finetune(model: nn.Module, teacher: nn.Module | None) -> tuple[dict[str, float], float]:
            t0 = time.perf_counter()
            convfx.finetune(model, loader, None, epochs=a.epochs, lr=a.lr, nesterov=True,
                            weight_decay=a.weight_decay, warmup_steps=a.warmup, teacher=teacher,
                            kd_alpha=a.kd_alpha, kd_temperature=a.kd_temperature, progress=a.progress,
                            seed=0, device=self.device, log_every=0, max_steps_per_epoch=a.max_steps)
            return self.evaluate(model, test_batches), time.perf_counter() - t0

        teacher: nn.Module = original
        if a.epochs > 0:
            baseline = copy.deepcopy(original)
            cached = self.baseline_cache(name)
            needs_teacher = any(m.endswith("+KD") for m in a.methods) and a.teacher == "finetuned"
            if self.have(name, "baseline", None) and cached.exists():
                baseline.load_state_dict(load_checkpoint(cached)["state_dict"])
                log.info("%s baseline: fine-tuned weights of the resumed run from %s", name, cached)
            elif self.have(name, "baseline", None) and not needs_teacher:
                log.info("%s baseline: measured in the resumed run (no teacher needed)", name)
            else:
                ev_ft, ft_s = finetune(baseline, None)
                atomic_save({"state_dict": baseline.state_dict()}, cached)
                self.res.add(Row(name, "baseline", None, base_macs, params, ev["top1"], ev["top5"],
                                 ev_ft["top1"], ev_ft["top5"], a.epochs, 0.0, ft_s,
                                 "uncompressed, same fine-tuning budget"))
                self.flush()
                log.info("%s baseline: %.2f -> %.2f after %d epochs (%.0fs)", name, ev["top1"], ev_ft["top1"],
                         a.epochs, ft_s)
            if a.teacher == "finetuned":
                teacher = baseline.eval()

        ignored = cifar_ignored
        # convfx+KD fine-tunes the compressed model of the convfx row ("--methods convfx+KD" alone skips the
        # cross-entropy fine-tuning but still compresses)
        to_compress = list(dict.fromkeys(m.removesuffix("+KD") for m in a.methods))
        for target in a.targets:
            for method in to_compress:
                labels = [m for m in ((method, method + "+KD") if structure(method) else (method,))
                          if m in a.methods and (a.epochs > 0 or not m.endswith("+KD"))]
                if all(self.have(name, m, target) for m in labels):
                    log.info("%s %s at %sx: measured in the resumed run", name, method, target)
                    continue
                if self.over_budget():
                    self.res.notes.append(f"{name} {method} at {target}x: not run (time budget reached)")
                    self.flush()
                    continue
                done = self.point(name, method, target, original, example, base_macs, calib, ignored,
                                  test_batches)
                if done is None:
                    continue
                model, first = done
                for label in labels:
                    if self.have(name, label, target):
                        continue
                    teach = teacher if label.endswith("+KD") else None
                    row = replace(first, method=label, epochs=a.epochs)
                    if a.epochs > 0 and not self.over_budget():
                        ev_ft, ft_s = finetune(copy.deepcopy(model), teach)
                        row.top1_ft, row.top5_ft, row.finetune_s = ev_ft["top1"], ev_ft["top5"], ft_s
                    self.res.add(row)
                    self.flush()
                    log.info("%s %s %.1fx: calib-only %.2f, FT %s", name, label, target, row.top1_calib,
                             fmt(row.top1_ft))
        if "seed" in a.methods and not self.over_budget() and not self.have(name, "seed", None):
            # The seed method's own operating point: VBMF ranks.
            t0 = time.perf_counter()
            model = convfx.compress(original, example, method="tucker", rank="vbmf", progress=False)
            bn_note = self.reestimate_bn(model, original, calib, self.bn_policy(name))
            comp_s = time.perf_counter() - t0
            ev_c = self.evaluate(model, test_batches)
            macs = conv_macs(model, example)
            row = Row(name, "seed", None, macs, sum(p.numel() for p in model.parameters()), ev_c["top1"],
                      ev_c["top5"], epochs=a.epochs, compress_s=comp_s, note="; ".join(n for n in ("VBMF ranks (the seed's own choice)", bn_note) if n))
            if a.epochs > 0 and not self.over_budget():
                ev_ft, ft_s = finetune(model, None)
                row.top1_ft, row.top5_ft, row.finetune_s = ev_ft["top1"], ev_ft["top5"], ft_s
            self.res.add(row)
            self.flush()

    # -- EfficientNet-Lite0 -----------------------------------------------------

    def lite(self) -> None:
        a = self.a
        name = "efficientnet_lite0"
        original = zoo.efficientnet_lite0(pretrained=True).eval().to(self.device)
        root = a.shared_data / "imagenet-val-1300"
        data = imagenet(root, "val", zoo.normalization_of(original), class_list=root / "wnids.txt")
        calib_set, select_set, report_set = lite_splits(data, a.lite_split, a.lite_calib, a.lite_select)
        test_set = select_set if a.split == "select" else report_set
        calib_loader = DataLoader(calib_set, batch_size=50, shuffle=False, num_workers=a.workers)
        test_loader = DataLoader(test_set, batch_size=100, shuffle=False, num_workers=a.workers)
        calib = [x.to(self.device) for x, _ in calib_loader]
        test = [(x, y) for x, y in test_loader]  # decoded once, reused for every model
        example = torch.zeros(1, 3, 224, 224, device=self.device)
        base_macs = conv_macs(original, example)
        self.res.base_macs[name] = base_macs
        log.info("%s: %d conv MACs, %d calibration / %d %s images (%s split)", name, base_macs, len(calib_set),
                 len(test_set), a.split, a.lite_split)

        def test_batches() -> Iterator[Any]:
            return iter(test)

        ev = self.evaluate(original, test_batches)
        params = sum(p.numel() for p in original.parameters())
        self.res.add(Row(name, "original", None, base_macs, params, ev["top1"], ev["top5"]))
        self.flush()
        for target in a.lite_targets:
            for method in a.methods:
                if method.endswith("+KD") or self.have(name, method, target):
                    continue  # +KD: no fine-tuning here, it would be the convfx row
                done = self.point(name, method, target, original, example, base_macs, calib, lite_ignored,
                                  test_batches)
                if done is not None:
                    self.res.add(done[1])
                    self.flush()


def lite_splits(data: Dataset, how: str, n_calib: int, n_select: int) -> tuple[Dataset, Dataset, Dataset]:
    """(calibration, selection, report) subsets of imagenet-val-1300, pairwise disjoint.

    ``random``: images drawn at random (seed 0): the first ``n_calib`` calibrate, the next
    ``n_select`` select, the rest report. ``classes``: a distribution-shift proxy; the
    classes present are shuffled (seed 0) and split in four: half of them report (all their
    images), a quarter selects (all their images), and calibration draws ``n_calib`` images
    from the last quarter; no class is in two sets.
    """
    from torch.utils.data import Subset

    if how == "random":
        calib, select, report = split_dataset(data, [n_calib, n_select, len(data) - n_calib - n_select], seed=0)
        return calib, select, report
    targets = torch.tensor([y for _, y in data.samples])  # type: ignore[attr-defined]
    classes = targets.unique()
    classes = classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(0))]
    half, quarter = len(classes) // 2, len(classes) * 3 // 4
    report_c, select_c, calib_c = classes[:half], classes[half:quarter], classes[quarter:]

    def images(cs: torch.Tensor) -> list[int]:
        return torch.nonzero(torch.isin(targets, cs)).flatten().tolist()

    calib = images(calib_c)
    calib = [calib[i] for i in torch.randperm(len(calib), generator=torch.Generator().manual_seed(1))[:n_calib]]
    return Subset(data, calib), Subset(data, images(select_c)), Subset(data, images(report_c))


def merge(paths: list[Path]) -> Results:
    """One table from several runs of this script (e.g. split to fit a time-limited machine).

    Rows are keyed by (model, method, target); a later file's row replaces an earlier one's.
    Every run's command and wall time are kept.
    """
    loaded = [json.loads(p.read_text()) for p in paths]
    first = loaded[0]
    res = Results(" ; ".join(f"`{d['command']}`" for d in loaded).strip("`"), first["machine"], first["settings"])
    rows: dict[tuple[Any, ...], Row] = {}
    for i, d in enumerate(loaded):
        res.base_macs.update(d["base_macs"])
        for r in d["rows"]:
            if r["method"].endswith("+KD") and r["top1_ft"] is None:
                continue  # before fine-tuning it is the convfx row
            row = Row(**r)
            rows[row_key(row)] = row
        res.notes += [f"run {i + 1}: {n}" if n.startswith("wall") else n for n in d["notes"]]
    res.rows = list(rows.values())
    drop_stale_notes(res)
    return res


def drop_stale_notes(res: Results) -> None:
    """Drop "<model> <method> at <t>x: not run/failed" notes of points that have a row now, and repeats."""
    def measured(note: str) -> bool:
        head = note.split(":", 1)[0].split()[:4]
        if not ("not run" in note or "failed" in note) or len(head) != 4:
            return False
        model, method, _, t = head
        return any(r.model == model and r.method in (method, method + "+KD") and r.target == float(t.rstrip("x"))
                   for r in res.rows)

    res.notes = list(dict.fromkeys(n for n in res.notes if not measured(n)))


#: --distill-* arguments -> DistillConfig fields (None on the command line: DistillConfig's default).
DISTILL_ARGS = {"distill_lr": "lr", "distill_batch": "batch_size", "distill_temperature": "temperature",
                "distill_bn": "bn", "distill_train": "train", "distill_kl_weight": "kl_weight",
                "distill_feature_weight": "feature_weight", "distill_features": "features",
                "distill_mixup": "mixup", "distill_checkpoints": "checkpoints"}

#: Settings that must agree for a resumed run to extend a saved one.
RESUME_SETTINGS = ("epochs", "max_steps", "lr", "batch_size", "warmup", "weight_decay", "bn", "kd_alpha",
                   "kd_temperature", "calib_images", "lite_calib", "teacher_desc", "split", "select_images",
                   "lite_split", "lite_select", "distill_steps", "distill_lr", "distill_batch",
                   "distill_temperature", "distill_bn", "distill_train", "distill_holdout", "distill_no_augment",
                   "distill_bench_bn", "distill_kl_weight", "distill_feature_weight", "distill_features",
                   "distill_mixup", "distill_checkpoints", "distill_max_seconds", "reuse_fit")


def resumed(path: Path, res: Results) -> Results:
    """The saved run at ``path`` extended by the run described by ``res`` (its command, machine, settings).

    Why: a fine-tuning grid on a CPU takes longer than one sitting; ``--resume`` measures
    only the points the saved file lacks. A different machine or training setting would
    mix incomparable rows, so either is an error naming what differs.
    """
    old = merge([path])
    diff = [k for k in RESUME_SETTINGS if old.settings.get(k) != res.settings.get(k)]
    if old.machine != res.machine:
        diff.append(f"machine ({old.machine!r} vs {res.machine!r})")
    if diff:
        raise SystemExit(f"--resume: {path} was made with other settings: {', '.join(diff)}; "
                         "use another --tag or the same settings")
    old.command = f"{old.command}` ; `{res.command}"
    old.settings = {**old.settings, "targets": sorted({*old.settings["targets"], *res.settings["targets"]}),
                    "lite_targets": sorted({*old.settings["lite_targets"], *res.settings["lite_targets"]})}
    return old


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared-data", type=Path, required=True, help="folder holding cifar10-jpeg/, cifar10-resnet/ "
                    "and imagenet-val-1300/")
    ap.add_argument("--models", default="resnet20,resnet56,efficientnet_lite0")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default="2.5,2,3,1.5", help="conv-MAC reductions for the CIFAR models")
    ap.add_argument("--lite-targets", default="1.3,1.5,2", help="conv-MAC reductions for EfficientNet-Lite0")
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs per point (0: calibration only)")
    ap.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs)")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--kd-alpha", type=float, default=0.9)
    ap.add_argument("--kd-temperature", type=float, default=4.0)
    ap.add_argument("--teacher", choices=("finetuned", "original"), default="finetuned")
    ap.add_argument("--bn", choices=("auto", "always", "never"), default=None,
                    help="BN re-estimation on the calibration images after compression; auto keeps it only "
                         "where it lowers the KL to the original's outputs on those images (default: always "
                         "for the CIFAR ResNets, auto for EfficientNet-Lite0)")
    ap.add_argument("--calib-images", type=int, default=1000, help="CIFAR train images for calibration + BN")
    ap.add_argument("--lite-calib", type=int, default=300, help="imagenet-val-1300 images for calibration")
    ap.add_argument("--refine-steps", type=int, default=300,
                    help="compress(refine_steps=) for the convfx-idr rows (default: %(default)s)")
    ap.add_argument("--split", choices=("report", "select"), default="report",
                    help="where top-1 is measured: 'select' (CIFAR: --select-images train images disjoint from "
                         "the calibration ones; Lite0: the selection split) to choose variants and settings, "
                         "'report' (CIFAR: the 10,000 test images; Lite0: the report split) once, after choosing")
    ap.add_argument("--select-images", type=int, default=2000, help="CIFAR train images of the selection split")
    ap.add_argument("--lite-split", choices=("random", "classes"), default="random",
                    help="EfficientNet-Lite0 splits of imagenet-val-1300: random images, or class-disjoint "
                         "calibration / selection / report classes (a distribution-shift proxy)")
    ap.add_argument("--lite-select", type=int, default=300, help="Lite0 selection images (random split)")
    ap.add_argument("--distill-steps", type=int, default=1000, help="compress(distill_steps=) for the +D rows")
    # None: compress's own default (passes.recover.DistillConfig), filled in by parse()
    ap.add_argument("--distill-lr", type=float, default=None)
    ap.add_argument("--distill-batch", type=int, default=None)
    ap.add_argument("--distill-temperature", type=float, default=None)
    ap.add_argument("--distill-bn", choices=BN_MODES, default=None)
    ap.add_argument("--distill-train", choices=TRAIN_SETS, default=None)
    ap.add_argument("--distill-kl-weight", type=float, default=None, help="weight of the output KL")
    ap.add_argument("--distill-feature-weight", type=float, default=None,
                    help="weight of the relative MSE on --distill-features (0: off)")
    ap.add_argument("--distill-features", default=None,
                    help="'penultimate' (input of the last Linear) or comma-separated module names")
    ap.add_argument("--distill-mixup", type=float, default=None, help="fraction of each batch blended (mixup)")
    ap.add_argument("--distill-checkpoints", type=int, default=None)
    ap.add_argument("--distill-holdout", type=float, default=None)
    ap.add_argument("--distill-max-seconds", type=float, default=None,
                    help="wall-time limit of the recovery stage (DistillConfig.max_seconds; default: none)")
    ap.add_argument("--no-reuse-fit", dest="reuse_fit", action="store_false",
                    help="+D rows call compress(distill_steps=) from scratch instead of running the recovery "
                         "stage on a copy of the plain row's fit of the same point (default: reuse when the "
                         "plain row is in --methods before it)")
    ap.add_argument("--distill-no-augment", action="store_true")
    ap.add_argument("--distill-bench-bn", choices=("auto", "always", "never"), default="never",
                    help="BN re-estimation by this script after compress for the +D rows (default: never; "
                         "compress's recovery handles BN per --distill-bn)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; later points are skipped, not cut")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="extend accuracy_<tag>.json in --out-dir: measure only the points it lacks (same "
                         "machine and settings; the fine-tuned baseline is reloaded from the cache)")
    args = ap.parse_args(argv)
    defaults = DistillConfig()
    for arg, name in DISTILL_ARGS.items():
        if getattr(args, arg) is None:
            setattr(args, arg, getattr(defaults, name))
    if args.distill_holdout is None:
        args.distill_holdout = convfx.CompressOptions().distill_holdout
    if isinstance(args.distill_features, str) and args.distill_features != "penultimate":
        args.distill_features = ",".join(f.strip() for f in args.distill_features.split(",") if f.strip())
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.targets = [float(t) for t in args.targets.split(",")]
    args.lite_targets = [float(t) for t in args.lite_targets.split(",")]
    for m in args.models:
        if m not in (*CIFAR_MODELS, "efficientnet_lite0"):
            ap.error(f"--models: unknown model {m!r}")
    for m in args.methods:
        if m not in ALL_METHODS:
            ap.error(f"--methods: unknown method {m!r} (choose from {', '.join(ALL_METHODS)})")
    if any(t < 1 for t in args.targets + args.lite_targets):
        ap.error("--targets/--lite-targets: reductions must be >= 1")
    return args


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)} GPU, torch {torch.__version__}, host {platform.machine()} "
                f"with {os.cpu_count()} CPUs")
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("convfx").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*pruning.*", category=UserWarning)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--merge"]:  # --merge OUT_DIR TAG RUN.json... [note:TEXT...]: re-render saved runs
        out_dir, tag = Path(argv[1]), argv[2]
        res = merge([Path(p) for p in argv[3:] if not p.startswith("note:")])
        res.notes += [p[5:].strip() for p in argv[3:] if p.startswith("note:")]
        ns = argparse.Namespace(out_dir=out_dir, tag=tag, time_budget=None, device="cpu")
        Bench(ns, res).flush()
        print(markdown(res))
        return 0
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    teacher_desc = ("the uncompressed model after the same fine-tuning (the baseline row)"
                    if args.teacher == "finetuned" else "the pretrained checkpoint")
    settings = {k: v for k, v in vars(args).items() if k in (*RESUME_SETTINGS, "targets", "lite_targets")}
    settings["teacher_desc"] = teacher_desc
    cmd = "python " + " ".join(["benchmarks/accuracy.py", *argv])
    res = Results(cmd, machine(torch.device(args.device)), settings)
    saved = args.out_dir / f"accuracy_{args.tag}.json"
    if args.resume and saved.exists():
        res = resumed(saved, res)
    bench = Bench(args, res)
    t0 = time.perf_counter()
    for m in args.models:
        if m == "efficientnet_lite0":
            bench.lite()
        else:
            bench.cifar(m)
    runs = sum(1 for n in res.notes if n.startswith("run ") and "wall time" in n)
    res.notes.append((f"run {runs + 1}: " if runs else "") + f"wall time {time.perf_counter() - t0:.0f} s"
                     + (f"; load average at end {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""))
    drop_stale_notes(res)
    bench.flush()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
