"""The ``convfx`` command line: compress, evaluate, fine-tune and report on CNNs.

Why a CLI on top of the library: the research workflow this project grew out of was a
script (``decomp``) driven by a handful of short flags; ``convfx decomp`` keeps those
flags so old command lines keep working, and the other subcommands expose each step.

Exit codes: 0 success, 2 bad usage or an error convfx understands (one ``convfx: error:``
line, ``--debug`` for the traceback), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import textwrap
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from passes.errors import ConvfxError
from passes.options import CompressOptions
from passes.ranks import COMPRESS_METHODS, RankSpec, validate_rank_spec

__all__ = ["main", "build_parser", "build_model", "format_table", "parse_rank", "parse_shape", "Measurement"]

log = logging.getLogger("convfx.cli")

_DATASETS = ("imagenet", "cifar10", "imagefolder-classlist")
_LOG_LOGGERS = ("convfx", "passes")


# ------------------------------------------------------------------------ arg types
def parse_rank(text: str) -> RankSpec:
    """``vbmf``, ``energy:F``, an int, a float in (0, 1] or ``r_out,r_in`` (argparse type)."""
    t = text.strip()
    value: RankSpec
    try:
        if t == "vbmf" or t.startswith("energy:"):
            value = t
        elif "," in t:
            parts = [p.strip() for p in t.split(",")]
            if len(parts) != 2:
                raise ValueError(f"rank: expected r_out,r_in, got {text!r}")
            value = (int(parts[0]), int(parts[1]))
        else:
            try:
                value = int(t)
            except ValueError:
                value = float(t)
        validate_rank_spec(value)
    except ValueError as exc:
        msg = str(exc) if str(exc).startswith("rank:") else f"cannot parse {text!r}"
        raise argparse.ArgumentTypeError(f"{msg} (use vbmf, energy:0.9, 8, 0.5 or 16,8)") from None
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` or ``1x3x224x224`` -> a tuple of positive ints (argparse type)."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"expected a shape like 1,3,224,224, got {text!r}")
    return shape


# -------------------------------------------------------------------------- parser
_EPILOG_DECOMP = """\
examples:
  convfx decomp -p /data/imagenet --arch resnet50 --weights DEFAULT -d cp --rank vbmf --out runs/r50
  convfx decomp -p /data/imagenet -m runs/r50/decomposed.pt -r runs/r50/checkpoints/last.pt --out runs/r50
  convfx decomp -p /data/imagenet -m runs/r50/decomposed.pt -s runs/r50/finetuned_state_dict.pt -v

outputs in --out: decomposed.pt (the compressed model, convfx.load), report.txt/report.json,
checkpoints/last.pt (resumable fine-tuning), finetuned_state_dict.pt (weights after
fine-tuning, for convfx.load(decomposed.pt, state_dict=...)), results.json.
MACs: 1 multiply-add = 1 (fvcore's count); GFLOPs = 2 x GMACs.
"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and logging")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    g.add_argument("--verbose", action="store_true", help="debug logging")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice; for demo: the idle cores). On a busy "
                        "machine fewer threads than cores is often much faster")


def _model_args(p: argparse.ArgumentParser, *, arch_default: str | None = None, shown: str | None = None) -> None:
    g = p.add_argument_group("model")
    shown = shown or arch_default
    g.add_argument("--arch", default=arch_default, metavar="NAME",
                   help="architecture: a torchvision name (resnet50, ...), cifar_resnet20/32/44/56/110 or "
                        f"efficientnet_lite0{f' (default: {shown})' if shown else ''}")
    g.add_argument("--weights", default=None, metavar="W",
                   help="pretrained weights: DEFAULT, a torchvision enum name (IMAGENET1K_V2), or a local "
                        "state-dict file; cifar_resnet20's DEFAULT is the checkpoint bundled with convfx "
                        "(default: random init)")


def _data_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("-p", "--data", metavar="PATH", required=required,
                   help="dataset root: a folder with train/ and val/ (imagenet) or train/ and test/ (cifar10) "
                        "class folders, a zip of those, or a torchvision CIFAR-10 root")
    g.add_argument("--dataset", choices=_DATASETS, default=None,
                   help="dataset layout and transforms (default: cifar10 for cifar_resnet*, imagenet otherwise)")
    g.add_argument("--class-list", metavar="FILE", default=None,
                   help="class names in label order (e.g. wnids.txt); required by imagefolder-classlist")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default: %(default)s)")
    g.add_argument("--workers", type=_non_negative_int, default=min(4, os.cpu_count() or 1),
                   help="data-loading worker processes (default: %(default)s)")
    g.add_argument("--eval-batches", type=_positive_int, default=None, metavar="N",
                   help="evaluate on the first N batches only (quick checks)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", type=_positive_int, default=5, help="fine-tuning epochs (default: %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=1e-3, help="peak SGD learning rate (default: %(default)s)")
    g.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                   help="at most N steps per epoch (quick runs)")
    g.add_argument("--bn-recalibrate", type=_non_negative_int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics from N training batches before fine-tuning")
    g.add_argument("--val-each-epoch", action="store_true", help="evaluate after every epoch")
    g.add_argument("--seed", type=int, default=0, help="seed for data order and augmentation (default: 0)")
    g.add_argument("-r", "--resume", metavar="PATH", default=None,
                   help="fine-tuning checkpoint (last.pt, or its folder) to resume from; use it with the same "
                        "model (-m) and settings")
    g.add_argument("--out", default="convfx-out", metavar="DIR",
                   help="output folder for models, checkpoints and reports (default: %(default)s)")


def _checked(parse: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``parse`` and rejects values failing ``ok``."""
    def convert(text: str) -> Any:
        try:
            v = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return convert


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_fraction = _checked(float, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")


# float() accepts "inf" and "nan": every float flag must refuse them (argparse names the flag).
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _budget_args(g: Any) -> None:
    """The flags that say how much to compress and what to recover: shared by compress and decomp."""
    g.add_argument("--rank", type=parse_rank, default="vbmf",
                   help="vbmf (default), energy:F, an int, a float in (0, 1] (fraction of channels), or r_out,r_in")
    g.add_argument("--flops-target", type=_fraction, default=None, metavar="F",
                   help="allocate ranks so that conv MACs are at most F x the original's (replaces --rank)")
    g.add_argument("--latency-target", type=_fraction, default=None, metavar="F",
                   help="allocate ranks so that the model runs in F x the original's measured time on this "
                        "machine, for the --input-shape batch (replaces --rank and --flops-target)")
    g.add_argument("--latency-backend", choices=("inductor", "eager"), default="inductor",
                   help="how the model will run, for --latency-target (default: %(default)s = torch.compile)")
    g.add_argument("--distill-steps", type=_non_negative_int, default=0, metavar="K",
                   help="after fitting, train the compressed net for K label-free steps to match the original's "
                        "outputs on the calibration inputs (needs calibration data; default: 0)")


def _add_decomp(sub: Any) -> None:
    """The ``decomp`` command's arguments."""
    p = sub.add_parser(
        "decomp", help="the full flow: evaluate, decompose, save, fine-tune, evaluate again",
        description=textwrap.fill(
            "Evaluate a model, decompose its convolutions (CP by default), save the decomposed model, "
            "fine-tune it with resumable checkpoints and evaluate again; prints a before/after table "
            "of top-1/top-5, conv GMACs/GFLOPs and parameters. Flags -p -d -m -r -s -v are those of "
            "the original research script.", 78),
        epilog=_EPILOG_DECOMP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_args(p, required=True)
    _model_args(p, shown="resnet50; with -m: the architecture recorded in the file")
    g = p.add_argument_group("decomposition")
    g.add_argument("-d", "--decomp", choices=COMPRESS_METHODS, default="cp",
                   help="decomposition (default: %(default)s; 1x1 convs always use SVD; auto: tucker or cp "
                        "per layer, with --flops-target; id: narrow the hidden channels of inverted-residual "
                        "blocks, with --flops-target and --calibrate)")
    _budget_args(g)
    g.add_argument("--calibrate", type=_positive_int, default=None, metavar="N",
                   help="fit the factors to each layer's outputs on N batches of the training split "
                        "(with its transforms) instead of to the weights alone")
    g.add_argument("--refine-steps", type=_non_negative_int, default=0, metavar="K",
                   help="with -d id: train each narrowed chain for K local, label-free gradient steps to "
                        "reproduce the original chain's output on the calibration data (default: 0, "
                        "least-squares refit only)")
    g.add_argument("-m", "--model", metavar="PATH", default=None,
                   help="an already-decomposed model saved by convfx (skips decomposition)")
    g.add_argument("-s", "--state-dict", metavar="PATH", default=None,
                   help="weights to load: into the decomposed model with -m (e.g. finetuned_state_dict.pt), "
                        "else into the original model before decomposition")
    g.add_argument("-v", "--evaluate", action="store_true", help="evaluate only, no fine-tuning")
    _train_args(p)
    _common(p)
    p.set_defaults(func=_cmd_decomp, arch_fallback="resnet50")


def _add_compress(sub: Any) -> None:
    """The ``compress`` command's arguments."""
    p = sub.add_parser(
        "compress", help="decompose a model and save it (no data needed)",
        description="Decompose the convolutions of a model and save the result with convfx.save; prints the "
                    "per-layer report. MACs are counted for --input-shape.")
    _model_args(p, arch_default="resnet50")
    p.add_argument("-s", "--state-dict", metavar="PATH", default=None, help="weights to load before decomposing")
    p.add_argument("-d", "--method", choices=COMPRESS_METHODS, default="tucker",
                   help="decomposition (default: %(default)s; auto: tucker or cp per layer, with --flops-target; "
                        "id: narrow the hidden channels of inverted-residual blocks, needs --calibration)")
    _budget_args(p)
    p.add_argument("--calibration", metavar="DIR", default=None,
                   help="unlabeled images (a folder in any layout, or a zip) to fit the factors to, with the "
                        "model's preprocessing (resize + center crop to --input-shape); no labels are read")
    p.add_argument("--calibration-images", type=_positive_int, default=None, metavar="N",
                   help="use at most N of the --calibration images (default: all)")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="N,C,H,W",
                   help="example input (default: 1,3,32,32 for cifar_resnet*, else 1,3,224,224)")
    p.add_argument("-o", "--output", metavar="PATH", default=None,
                   help="where to save the compressed model (default: <arch>-<method>.pt)")
    _common(p)
    p.set_defaults(func=_cmd_compress)


def _add_eval(sub: Any) -> None:
    """The ``eval`` command's arguments."""
    p = sub.add_parser(
        "eval", help="evaluate a saved compressed model or a plain architecture",
        description="Top-1/top-5 accuracy and loss on the validation split, plus conv MACs and parameters. "
                    "Evaluates -m (a convfx model file) or --arch/--weights.")
    _data_args(p, required=True)
    _model_args(p, shown="resnet50; with -m: the architecture recorded in the file")
    p.add_argument("-m", "--model", metavar="PATH", default=None, help="a model saved by convfx")
    p.add_argument("-s", "--state-dict", metavar="PATH", default=None, help="weights to load into the model")
    _common(p)
    p.set_defaults(func=_cmd_eval, arch_fallback="resnet50")


def _add_finetune(sub: Any) -> None:
    """The ``finetune`` command's arguments."""
    p = sub.add_parser(
        "finetune", help="fine-tune a saved compressed model",
        description="Fine-tune a model saved by convfx (resumable; checkpoints in --out/checkpoints) and save "
                    "the weights as --out/finetuned_state_dict.pt; evaluates before and after.")
    _data_args(p, required=True)
    p.add_argument("-m", "--model", metavar="PATH", required=True, help="a model saved by convfx")
    p.add_argument("-s", "--state-dict", metavar="PATH", default=None, help="weights to start from")
    p.add_argument("--arch", default=None, metavar="NAME",
                   help="registry name of the uncompressed architecture, when the file does not record one")
    _train_args(p)
    _common(p)
    p.set_defaults(func=_cmd_finetune, weights=None, arch_fallback=None)


def _add_report(sub: Any) -> None:
    """The ``report`` command's arguments."""
    p = sub.add_parser(
        "report", help="print the per-layer report of a saved model, or of compressing an architecture",
        description="With MODEL: print the report stored in a convfx model file. With --arch: compress that "
                    "architecture (random or given weights, no data) and print the report without saving.")
    p.add_argument("file", nargs="?", metavar="MODEL", help="a model saved by convfx")
    _model_args(p, arch_default=None)
    p.add_argument("-d", "--method", choices=COMPRESS_METHODS, default="tucker",
                   help="decomposition for --arch (default: %(default)s; auto needs --flops-target)")
    p.add_argument("--rank", type=parse_rank, default="vbmf", help="rank rule for --arch (default: vbmf)")
    p.add_argument("--flops-target", type=_fraction, default=None, metavar="F",
                   help="for --arch: conv MACs at most F x the original's (replaces --rank)")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="N,C,H,W",
                   help="example input for --arch (default: 1,3,32,32 for cifar_resnet*, else 1,3,224,224)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-rows", type=_positive_int, default=None, metavar="N",
                   help="show at most N layers; with --json: keep the first N entries of \"layers\" and add "
                        "\"layers_omitted\" (how many were left out)")
    _common(p)
    p.set_defaults(func=_cmd_report)


def _add_demo(sub: Any) -> None:
    """The ``demo`` command's arguments."""
    p = sub.add_parser(
        "demo", help="compress the bundled CIFAR-10 ResNet-20 and plot accuracy vs MACs (offline, ~2-3 min)",
        description="Runs on a fresh clone without data or network: loads the bundled pretrained CIFAR-10 "
                    "ResNet-20 and 2000 test / 500 calibration images, compresses it with Tucker-2 at several "
                    "conv-MAC budgets (factors fitted on the calibration images, then BatchNorm statistics "
                    "re-estimated on them; one budget also data-free, and the smallest also with method=auto, tucker or "
                    "cp per layer), prints the reports and "
                    "writes the compressed model and an accuracy-vs-MACs plot to --out.")
    p.add_argument("--out", default="convfx-demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="fewer settings and 500 test images (~4x faster)")
    _common(p)
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The full ``convfx`` argument parser (exposed for documentation and tests)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="convfx",
        description="Compress trained CNNs by replacing convolutions with low-rank Tucker/CP/SVD "
                    "factorizations (a torch.fx compiler pass), then evaluate and fine-tune them.",
        epilog="run 'convfx <command> --help' for the options of each command; "
               "'convfx demo' needs no data or network.",
    )
    parser.add_argument("--version", action="version", version=f"convfx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    _add_decomp(sub)
    _add_compress(sub)
    _add_eval(sub)
    _add_finetune(sub)
    _add_report(sub)
    _add_demo(sub)
    return parser


# ------------------------------------------------------------------------- logging
def _setup_logging(args: argparse.Namespace) -> Callable[[], None]:
    """Send convfx's logs to stderr at the chosen level; returns a function that undoes it.

    Undoing matters when ``main`` is called in-process (tests, notebooks): the caller's
    logger levels must not stay changed.
    """
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(name)s: %(message)s" if args.verbose else "%(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    saved: list[tuple[logging.Logger, int]] = []
    for name in _LOG_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level))
        lg.addHandler(handler)
        lg.setLevel(level)

    def restore() -> None:
        for lg, old in saved:
            lg.removeHandler(handler)
            lg.setLevel(old)

    return restore


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


# -------------------------------------------------------------------------- models
def _is_cifar(arch: str | None) -> bool:
    return bool(arch) and str(arch).startswith("cifar_resnet")


def build_model(arch: str, weights: str | None) -> nn.Module:
    """Build ``arch`` with ``weights`` (see ``--weights``), in eval mode."""
    from . import zoo

    if not zoo.is_known_arch(arch):
        zoo.build(arch)  # raises the ValueError with suggestions
    if _is_cifar(arch):
        if weights is None:
            model = zoo.build(arch)
        elif weights == "DEFAULT":
            if arch != "cifar_resnet20":
                raise ValueError(f"--weights DEFAULT: convfx bundles pretrained weights for cifar_resnet20 only, "
                                 f"not {arch}; pass a local state-dict file")
            model = zoo.build(arch, checkpoint=zoo.DEMO_CHECKPOINT)
        else:
            model = zoo.build(arch, checkpoint=weights)
    elif arch == "efficientnet_lite0":
        local = weights is not None and weights != "DEFAULT"
        model = zoo.build(arch, pretrained=weights == "DEFAULT")
        if local:
            zoo.load_checkpoint_into(model, weights)  # type: ignore[arg-type]
    else:
        model = zoo.build(arch, weights=weights)
    return model.eval()


def _random_weights_warning(args: argparse.Namespace, arch: str) -> str | None:
    """Warn (log) that ``arch`` will be compressed with random weights; the line to print too, or None.

    VBMF finds no structure in random kernels and cuts every layer to rank (1, 1): a huge,
    meaningless "reduction" that nothing else in the output would flag.
    """
    if args.weights is not None or getattr(args, "state_dict", None):
        return None
    message = (f"no --weights given: {arch} has random weights, so the chosen ranks, errors and reductions "
               "say nothing about a trained model (pass --weights DEFAULT or a state-dict file)")
    log.warning(message)
    return f"warning: {message}"


def _load_saved(path: str, arch: str | None) -> torch.fx.GraphModule:
    """A convfx model file; ``arch`` (``--arch``) supplies the architecture when the file lacks one."""
    from passes.errors import UNKNOWN_ARCH

    from . import serialize

    base = build_model(arch, None) if arch is not None else None  # weights come from the file
    try:
        return serialize.load(path, model=base)
    except ConvfxError as exc:
        if exc.kind == UNKNOWN_ARCH:
            raise ConvfxError(exc.reason, where=exc.where, kind=exc.kind,
                              hint="pass --arch NAME (the uncompressed architecture)") from exc
        raise


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def _default_shape(arch: str | None) -> tuple[int, ...]:
    return (1, 3, 32, 32) if _is_cifar(arch) else (1, 3, 224, 224)


# ---------------------------------------------------------------------------- data
def _datasets(args: argparse.Namespace, model: nn.Module, arch: str | None, need_train: bool,
              need_calib: bool = False) -> tuple[Dataset[Any], Dataset[Any] | None, Dataset[Any] | None]:
    """(validation, training or None, calibration or None) datasets for ``args``."""
    from . import data, zoo

    kind = args.dataset or ("cifar10" if _is_cifar(arch) else "imagenet")
    norm = zoo.normalization_of(model)
    if kind == "imagefolder-classlist" and not args.class_list:
        raise ValueError("--dataset imagefolder-classlist needs --class-list FILE")
    if kind == "cifar10":
        if args.class_list:
            raise ValueError("--class-list applies to imagenet-style folders, not --dataset cifar10")
        val = data.cifar10(args.data, "test", norm)
        train = data.cifar10(args.data, "train", norm, train_augment=True) if need_train else None
        calib = data.cifar10(args.data, "train", norm) if need_calib else None
    else:
        val = data.imagenet(args.data, "val", norm, class_list=args.class_list)
        train = data.imagenet(args.data, "train", norm, class_list=args.class_list) if need_train else None
        calib = train if need_calib and train is not None else (
            data.imagenet(args.data, "train", norm, class_list=args.class_list) if need_calib else None)
    log.info("data: %s from %s (%d validation images%s)", kind, args.data, len(val),  # type: ignore[arg-type]
             f", {len(train)} training images" if train is not None else "")  # type: ignore[arg-type]
    return val, train, calib


def _loader(args: argparse.Namespace, ds: Dataset[Any], *, shuffle: bool) -> Any:
    from .data import make_loader

    return make_loader(ds, args.batch_size, shuffle=shuffle, workers=args.workers, seed=getattr(args, "seed", 0))


# ----------------------------------------------------------------------- measuring
@dataclass
class Measurement:
    """One column of the before/after table; None where not measured."""

    name: str
    top1: float | None = None
    top5: float | None = None
    loss: float | None = None
    n: int | None = None
    conv_macs: int | None = None
    params: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    from .api import analyze

    ref = next(model.parameters(), None)
    x = example.to(ref.device) if ref is not None else example
    a = analyze(model, x)
    return a.conv_macs, a.params


def _measure(name: str, model: nn.Module, loader: Any, example: torch.Tensor, args: argparse.Namespace,
             device: torch.device) -> Measurement:
    from .train import evaluate

    macs, params = _count(model, example)
    log.info("evaluating %s model", name)
    r = evaluate(model, loader, device=device, progress=_progress(args), max_batches=args.eval_batches, desc=name)
    return Measurement(name, r["top1"], r["top5"], r["loss"], int(r["n"]), macs, params)


def format_table(cols: list[Measurement]) -> str:
    """The labelled before/after table (conv GFLOPs = 2 x conv GMACs)."""
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [
        ("top-1 (%)", [f(c.top1, ".2f") for c in cols]),
        ("top-5 (%)", [f(c.top5, ".2f") for c in cols]),
        ("conv GMACs", [f(None if c.conv_macs is None else c.conv_macs / 1e9, ".4f") for c in cols]),
        ("conv GFLOPs (2xMACs)", [f(None if c.conv_macs is None else 2 * c.conv_macs / 1e9, ".4f") for c in cols]),
        ("params (M)", [f(None if c.params is None else c.params / 1e6, ".4f") for c in cols]),
    ]
    head = [""] + [c.name for c in cols]
    widths = [max(len(head[0]), *(len(r[0]) for r in rows))]
    widths += [max(len(c.name), *(len(r[1][i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(head)),
             "  ".join("-" * w for w in widths)]
    for label, vals in rows:
        lines.append("  ".join([label.ljust(widths[0])] + [v.rjust(w) for v, w in zip(vals, widths[1:])]))
    return "\n".join(lines)


def _resume_dir(args: argparse.Namespace, out: Path) -> tuple[Path, bool]:
    """Where finetune keeps ``last.pt``, and whether to resume from it."""
    from .train import CHECKPOINT_NAME

    default = out / "checkpoints"
    if not args.resume:
        return default, False
    r = Path(args.resume)
    if r.is_dir():
        if not (r / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"-r {r}: no {CHECKPOINT_NAME} in this folder")
        return r, True
    if not r.is_file():
        raise FileNotFoundError(f"-r: fine-tuning checkpoint not found: {r}")
    if r.name == CHECKPOINT_NAME:
        return r.parent, True
    default.mkdir(parents=True, exist_ok=True)
    tmp = default / f".{CHECKPOINT_NAME}.copy"
    shutil.copyfile(r, tmp)
    os.replace(tmp, default / CHECKPOINT_NAME)
    log.info("resuming from a copy of %s in %s", r, default)
    return default, True


# ------------------------------------------------------------------------ commands
def _flow(args: argparse.Namespace, *, train: bool) -> int:
    """decomp / finetune: [build, evaluate, compress, save] or load; [fine-tune, save]; evaluate."""
    from . import serialize, zoo
    from .api import compress_with
    from .train import finetune

    out = Path(args.out)  # created once the model and data are known to be usable
    device = _device(args.device)
    cols: list[Measurement] = []
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "func"}}

    if args.model:
        if args.weights is not None:
            log.warning("--weights is ignored with -m: the weights come from the file (use -s for others)")
        gm = _load_saved(args.model, args.arch)
        if args.state_dict:
            serialize.load_state_dict(gm, args.state_dict)
        arch = zoo.arch_name(gm)
        val_ds, train_ds, _ = _datasets(args, gm, arch, need_train=train)
        out.mkdir(parents=True, exist_ok=True)
        example = val_ds[0][0].unsqueeze(0)
        report = getattr(gm, "convfx_report", None)
        if report is not None:
            cols.append(Measurement("original", conv_macs=report.conv_macs_before, params=report.params_before))
        val = _loader(args, val_ds, shuffle=False)
    else:
        arch = args.arch or args.arch_fallback
        original = build_model(arch, args.weights)
        if args.state_dict:
            serialize.load_state_dict(original, args.state_dict)
        val_ds, train_ds, calib_ds = _datasets(args, original, arch, need_train=train,
                                               need_calib=args.calibrate is not None)
        out.mkdir(parents=True, exist_ok=True)
        example = val_ds[0][0].unsqueeze(0)
        val = _loader(args, val_ds, shuffle=False)
        cols.append(_measure("original", original, val, example, args, device))
        ref = next(original.parameters())
        calibration = None if calib_ds is None else _loader(args, calib_ds, shuffle=True)
        random_note = _random_weights_warning(args, arch)
        if random_note:
            print(random_note)
        gm = compress_with(original, example.to(ref.device), args.options.replace(calibration=calibration))
        zoo.tag_model(gm, arch=arch, normalization=zoo.normalization_of(original))
        del original
        path = serialize.save(gm, out / "decomposed.pt")
        report = gm.convfx_report
        (out / "report.txt").write_text(report.to_table() + "\n")
        (out / "report.json").write_text(report.to_json() + "\n")
        print(report.totals_table())
        print(f"decomposed model saved to {path}")
    cols.append(_measure("decomposed", gm, val, example, args, device))

    if not train and getattr(args, "resume", None):
        log.warning("-r is ignored with -v (no fine-tuning)")
    if train:
        assert train_ds is not None
        ckpt_dir, resume = _resume_dir(args, out)
        hist = finetune(
            gm, _loader(args, train_ds, shuffle=True), val if args.val_each_epoch else None,
            epochs=args.epochs, lr=args.lr, bn_recalibrate=args.bn_recalibrate, checkpoint_dir=ckpt_dir,
            resume=resume, seed=args.seed, max_steps_per_epoch=args.max_steps, progress=_progress(args),
            device=device,
        )
        results["finetune"] = hist
        sd = serialize.save_state_dict(gm, out / "finetuned_state_dict.pt")
        print(f"fine-tuned weights saved to {sd} (load with convfx.load({args.model or out / 'decomposed.pt'}, "
              f"state_dict='{sd}'))")
        cols.append(_measure("fine-tuned", gm, val, example, args, device))

    results["table"] = [c.as_dict() for c in cols]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    n = cols[-1].n
    print()
    print(format_table(cols))
    print(f"accuracy on {n} validation images of {args.data}; MACs for one {'x'.join(map(str, example.shape))} "
          "input, 1 multiply-add = 1 (fvcore)")
    return 0


#: Stands for the calibration loader in options built before the data is read (the loader
#: replaces it); an empty iterable, so that the rules about calibration apply as they will.
_CALIBRATION_LATER: tuple[()] = ()


def _compress_options(args: argparse.Namespace, method: str, calibrated: bool = False) -> CompressOptions:
    """The compression options a command asks for, checked now, before any model or data is loaded."""
    return CompressOptions(method=method, rank=args.rank, flops_target=args.flops_target,
                           calibration=_CALIBRATION_LATER if calibrated else None,
                           calibration_batches=getattr(args, "calibrate", None),
                           refine_steps=getattr(args, "refine_steps", 0), progress=_progress(args),
                           latency_target=getattr(args, "latency_target", None),
                           latency_backend=getattr(args, "latency_backend", "inductor"),
                           distill_steps=getattr(args, "distill_steps", 0))


def _calibration_images(args: argparse.Namespace, model: nn.Module, shape: tuple[int, ...]) -> Any:
    """A loader of the --calibration images (unlabeled), preprocessed as the model expects, at ``shape``."""
    from torch.utils.data import Subset

    from . import data, zoo

    size = shape[-1]
    norm = zoo.normalization_of(model)
    transform = (data.cifar10_transform(norm) if size == 32 else
                 data.imagenet_transform("val", norm, size=size, resize=round(size * 256 / 224)))
    images = data.unlabeled_images(args.calibration, transform)
    if args.calibration_images is not None and args.calibration_images < len(images):
        picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.calibration_images]
        images = Subset(images, picked.tolist())  # type: ignore[assignment]
    log.info("calibrating on %d unlabeled images from %s", len(images), args.calibration)
    return data.make_loader(images, 50, shuffle=False, workers=getattr(args, "workers", 0) or 0)


def _cmd_decomp(args: argparse.Namespace) -> int:
    if not args.model:
        args.options = _compress_options(args, args.decomp, calibrated=args.calibrate is not None)
    return _flow(args, train=not args.evaluate)


def _cmd_finetune(args: argparse.Namespace) -> int:
    return _flow(args, train=True)


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import serialize, zoo

    device = _device(args.device)
    if args.model:
        model: nn.Module = _load_saved(args.model, args.arch)
        name = Path(args.model).name
    else:
        arch = args.arch or args.arch_fallback
        model = build_model(arch, args.weights)
        name = arch
    if args.state_dict:
        serialize.load_state_dict(model, args.state_dict)
    arch = zoo.arch_name(model)
    val_ds, _, _ = _datasets(args, model, arch, need_train=False)
    example = val_ds[0][0].unsqueeze(0)
    m = _measure(name, model, _loader(args, val_ds, shuffle=False), example, args, device)
    print(format_table([m]))
    print(f"loss {m.loss:.4f} on {m.n} validation images of {args.data}; MACs for one "
          f"{'x'.join(map(str, example.shape))} input, 1 multiply-add = 1 (fvcore)")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from . import serialize, zoo
    from .api import compress_with

    options = _compress_options(args, args.method, calibrated=args.calibration is not None)
    model = build_model(args.arch, args.weights)
    if args.state_dict:
        serialize.load_state_dict(model, args.state_dict)
    shape = args.input_shape or _default_shape(args.arch)
    random_note = _random_weights_warning(args, args.arch)
    if args.calibration is not None:
        options = options.replace(calibration=_calibration_images(args, model, shape))
    gm = compress_with(model, torch.randn(*shape), options)
    zoo.tag_model(gm, arch=args.arch, normalization=zoo.normalization_of(model))
    path = serialize.save(gm, args.output or f"{args.arch}-{args.method}.pt")
    print(gm.convfx_report.to_table())
    if random_note:
        print(f"\n{random_note}")
    print(f"\ncompressed model saved to {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from . import serialize
    from .api import compress_with
    from .report import Report

    if (args.file is None) == (args.arch is None):
        raise ValueError("give either a saved MODEL file or --arch NAME (not both)")
    random_note = None
    if args.file is not None:
        spec = serialize.read_spec(args.file)
        if not isinstance(spec.get("report"), str):
            raise ConvfxError("the file stores no report", where=args.file,
                              hint="it was saved from a model that compress() did not produce")
        report = Report.from_json(spec["report"])
        title = f"{args.file} (arch {spec.get('arch') or 'unknown'})"
    else:
        options = _compress_options(args, args.method)
        model = build_model(args.arch, args.weights)
        shape = args.input_shape or _default_shape(args.arch)
        random_note = _random_weights_warning(args, args.arch)  # logged; printed below unless --json
        report = compress_with(model, torch.randn(*shape), options).convfx_report
        budget = f"flops_target {args.flops_target}" if args.flops_target is not None else f"rank {args.rank}"
        title = f"{args.arch} compressed with {args.method}, {budget}"
    if args.json:
        print(_report_json(report, args.max_rows))
    else:
        print(title)
        if random_note:
            print(random_note)
        print(report.to_table(max_rows=args.max_rows))
    return 0


def _report_json(report: Any, max_rows: int | None) -> str:
    """The report as JSON; with ``max_rows`` only the first layers, and how many were left out."""
    if max_rows is None:
        return report.to_json()
    data = report.to_dict()
    layers = list(data.get("layers", []))
    data["layers"] = layers[:max_rows]
    data["layers_omitted"] = max(len(layers) - max_rows, 0)
    return json.dumps(data, indent=2)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, fast=args.fast, threads=args.threads, progress=_progress(args))
    return 0


# ---------------------------------------------------------------------------- main
_USER_ERRORS = (ConvfxError, ValueError, OSError)


def _print_error(exc: BaseException) -> None:
    if isinstance(exc, ConvfxError):
        text = f"[{exc.where}] {exc.reason}" if exc.where else exc.reason
        hint = exc.hint
    else:
        text, hint = str(exc) or type(exc).__name__, None
    lines = text.strip().splitlines() or [type(exc).__name__]
    print(f"convfx: error: {lines[0]}", file=sys.stderr)
    for extra in lines[1:]:
        print(f"  {extra}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``convfx`` command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    restore_logging = _setup_logging(args)
    threads = torch.get_num_threads()
    if args.threads is not None and args.command != "demo":  # the demo sets (and restores) its own
        torch.set_num_threads(args.threads)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("convfx: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        _print_error(exc)
        return 2
    finally:
        torch.set_num_threads(threads)
        restore_logging()


if __name__ == "__main__":
    sys.exit(main())
