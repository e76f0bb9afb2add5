"""``convfx demo``: the whole idea in a few minutes, offline, on a laptop CPU.

Why: a fresh clone should show what convfx does without datasets, downloads or a
GPU. Everything comes from the package: the pretrained CIFAR-10 ResNet-20
(:func:`convfx.zoo.demo_model`) and 2000 test / 500 calibration JPEGs
(:func:`convfx.data.demo_data`). The demo compresses the network with Tucker-2 at
several conv-MAC budgets (and with ``method="auto"`` at the smallest), fitting the factors once from the weights alone and once
to the layer outputs on the calibration images, re-estimates BatchNorm statistics
on those images (the factorized layers shift the activations every BN normalizes),
evaluates each model, prints the per-layer report and a totals table, saves the main
setting with :func:`convfx.serialize.save` and plots top-1 against conv MACs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DemoRow", "DemoResult", "TARGETS", "FAST_TARGETS", "MAIN_TARGET", "AUTO_TARGET", "choose_threads",
           "run_demo"]

log = logging.getLogger(__name__)

#: Conv-MAC budgets (fractions of the original's), each with factors fitted on calibration images.
TARGETS: tuple[float, ...] = (0.75, 0.5, 0.35)
FAST_TARGETS: tuple[float, ...] = (0.5,)
#: The budget that is also fitted data-free (for comparison), reported layer by layer and saved.
MAIN_TARGET = 0.5
#: The budget at which ``method="auto"`` (tucker or cp per layer) is shown next to Tucker-2 (not with ``fast``).
AUTO_TARGET = 0.35
#: ``latency_target`` of the latency row: half the original's measured time on this CPU, for a batch of
#: :data:`LATENCY_BATCH` images run eagerly (not with ``fast``).
LATENCY_TARGET = 0.5
LATENCY_BATCH = 64
#: Label-free recovery steps of the best row (auto at :data:`AUTO_TARGET`, then ``distill_steps``).
DISTILL_STEPS = 300

_PLOT_NAME = "demo_accuracy_vs_macs.png"
_MODEL_NAME = "demo_resnet20_tucker.pt"
_RESULTS_NAME = "demo_results.json"
_BN_BATCHES = 5  # x 100 images = the whole calibration set
_EVAL_BATCH = 250


@dataclass
class DemoRow:
    """One model in the totals table (MACs: fvcore, 1 multiply-add = 1, per 32x32 image).

    ``top1``/``top5`` are measured after BN re-estimation (except after label-free recovery,
    which trains against the stored statistics: re-estimating them afterwards cost 2.6 points of
    top-1 on the CIFAR ResNet-20's selection split); ``top1_raw`` before it (only
    for the data-free main setting, where it shows what re-estimation buys).
    """

    label: str
    fit: str  # "-" | "data-free" | "calibrated"
    target: float | None
    conv_macs: int
    params: int
    top1: float
    top5: float
    top1_raw: float | None = None
    seconds: float = 0.0
    method: str = "tucker"  # "tucker" | "auto" | "-" (the original)
    speedup: float | None = None  # latency row: the measured speedup its report gives
    group: str = ""  # which line of the plot it belongs to


@dataclass(frozen=True)
class Setting:
    """One compressed row: how it is compressed and labelled."""

    method: str
    target: float  # a conv-MAC fraction, or for ``latency`` a fraction of the measured time
    fit: str  # "data-free" | "calibrated"
    latency: bool = False
    distill_steps: int = 0

    @property
    def label(self) -> str:
        if self.latency:
            return f"{self.method} {self.target:.0%} time"
        return f"{self.method} {self.target:.0%} MACs" + (" + recovery" if self.distill_steps else "")


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""

    rows: list[DemoRow]
    model_path: Path
    plot_path: Path
    results_path: Path
    reload_identical: bool
    test_images: int
    threads: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def choose_threads(requested: int | None = None) -> int:
    """Torch CPU threads for the demo: ``requested``, else the idle cores (1..8).

    With more threads than idle cores, OpenMP workers wait on each other and small
    convolutions get several times *slower*; on a shared machine one thread wins.
    """
    if requested is not None:
        return max(1, int(requested))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        idle = cores - os.getloadavg()[0]
    except (AttributeError, OSError):
        idle = float(cores)
    return max(1, min(cores, 8, math.floor(idle + 0.5)))


def _table(rows: list[DemoRow], base_macs: int) -> str:
    from .report import format_count

    head = ["model", "factors fit", "conv MACs", "conv GFLOPs", "reduction", "params", "top-1 %", "top-5 %",
            "measured speedup"]
    body = [[r.label, r.fit, format_count(r.conv_macs), f"{2 * r.conv_macs / 1e9:.4f}",
             f"{base_macs / max(r.conv_macs, 1):.2f}x", format_count(r.params), f"{r.top1:.2f}", f"{r.top5:.2f}",
             "-" if r.speedup is None else f"{r.speedup:.2f}x"]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])


@dataclass
class _Data:
    """The demo's model and bundled data, loaded once."""

    model: torch.nn.Module
    test_loader: Any
    calib_loader: Any
    n_test: int
    n_calib: int
    example: torch.Tensor
    base_macs: int = 0


def _load(fast: bool) -> _Data:
    from . import zoo
    from .data import demo_data, make_loader, split_dataset

    model = zoo.demo_model()
    test, calib = demo_data(zoo.normalization_of(model))
    if fast:
        (test,) = split_dataset(test, [500], seed=0)
    return _Data(model, make_loader(test, _EVAL_BATCH, shuffle=False), make_loader(calib, 100, shuffle=False),
                 len(test), len(calib), torch.zeros(1, 3, 32, 32))  # type: ignore[arg-type]


def _settings(fast: bool) -> list[Setting]:
    """Every compressed row, in table order."""
    targets = FAST_TARGETS if fast else TARGETS
    runs = [Setting("tucker", t, fit) for t in targets
            for fit in (("data-free", "calibrated") if t == MAIN_TARGET else ("calibrated",))]
    if not fast:
        runs += [Setting("auto", AUTO_TARGET, "calibrated"),
                 Setting("auto", AUTO_TARGET, "calibrated", distill_steps=DISTILL_STEPS),
                 Setting("tucker", LATENCY_TARGET, "calibrated", latency=True)]
    return runs


def _compress_row(d: _Data, s: Setting, progress: bool) -> tuple[DemoRow, torch.fx.GraphModule]:
    """Compress one setting, re-estimate BN on the calibration images, evaluate; print one line."""
    from .api import analyze, compress
    from .train import evaluate, recalibrate_bn

    t0 = time.perf_counter()
    label = s.label
    calibration = d.calib_loader if s.fit == "calibrated" else None
    if s.latency:  # timed on a batch, eagerly, on this machine
        x = d.example.expand(LATENCY_BATCH, -1, -1, -1).contiguous()
        gm = compress(d.model, x, method=s.method, latency_target=s.target, latency_backend="eager",
                      calibration=calibration, progress=False)
    else:
        gm = compress(d.model, d.example, method=s.method, flops_target=s.target, calibration=calibration,
                      distill_steps=s.distill_steps, progress=False)
    raw = None
    if s.fit == "data-free":  # what the weights alone give, before and after BN re-estimation
        raw = evaluate(gm, d.test_loader, progress=progress, desc=f"{label} {s.fit}")["top1"]
    if not s.distill_steps:
        recalibrate_bn(gm, d.calib_loader, _BN_BATCHES)
    ev = evaluate(gm, d.test_loader, progress=progress, desc=f"{label} {s.fit}")
    rep = gm.convfx_report
    macs = analyze(gm, d.example).conv_macs if s.latency else rep.conv_macs_after  # per 32x32 image
    speedup = rep.latency["measured_speedup"] if rep.latency else None
    row = DemoRow(label, s.fit, s.target, macs, rep.params_after, ev["top1"], ev["top5"], raw,
                  time.perf_counter() - t0, s.method, speedup, _group(s, d.n_calib))
    structures = sorted({r.method for r in rep.factorized if r.method})
    print(f"{label}, {s.fit}: conv MACs {macs / 1e6:.2f}M "
          f"({d.base_macs / max(macs, 1):.2f}x fewer), top-1 {ev['top1']:.2f}%"
          + (" (BN statistics kept)" if s.distill_steps else " after BN re-estimation")
          + (f" ({raw:.2f}% before)" if raw is not None else "")
          + (f"; structures chosen: {', '.join(structures)}" if s.method == "auto" else "")
          + (f"; measured {speedup:.2f}x faster (batch {LATENCY_BATCH}, eager)" if speedup else ""))
    for note in rep.notes:
        if note.startswith(("distill: ", "latency_target=")):
            print(f"  {note}")
    return row, gm


def _group(s: Setting, n_calib: int) -> str:
    """The plot line a row belongs to."""
    if s.latency:
        return f"latency_target (measured time, batch {LATENCY_BATCH}, eager), calibrated + BN re-est."
    if s.distill_steps:
        return f"method=auto + {s.distill_steps} label-free recovery steps (BN kept)"
    if s.method == "auto":
        return "method=auto (tucker or cp per layer), calibrated + BN re-est."
    if s.fit == "data-free":
        return "Tucker-2, data-free + BN re-est."
    return f"Tucker-2, fitted on {n_calib} calibration images + BN re-est."


def _save_and_reload(gm: torch.fx.GraphModule, d: _Data, out: Path) -> tuple[Path, bool]:
    """Save the main setting, load it back, and check it computes the same bits."""
    from . import serialize, zoo

    model_path = serialize.save(gm, out / _MODEL_NAME, arch="cifar_resnet20",
                                normalization=zoo.normalization_of(d.model))
    reloaded = serialize.load(model_path)
    x = next(iter(d.test_loader))[0][:16]
    with torch.no_grad():
        identical = bool(torch.equal(gm.eval()(x), reloaded.eval()(x)))
    return model_path, identical


def _plot(rows: list[DemoRow], n_calib: int, n_test: int, out: Path) -> Path:
    from .plot import Point, plot_accuracy_vs_macs

    offsets = [(6, -14), (-6, 8), (8, -14), (8, 6), (-30, -14)]
    order = list(dict.fromkeys(r.group for r in rows[1:]))
    points = [Point("original", rows[0].conv_macs, rows[0].top1, reference=True)]
    for r in rows[1:]:
        label = f"{r.target:.0%}" + (f" ({r.speedup:.2f}x)" if r.speedup else "")
        points.append(Point(label, r.conv_macs, r.top1, group=r.group, offset=offsets[order.index(r.group) % 5]))
        if r.top1_raw is not None:
            points.append(Point(f"{r.target:.0%}", r.conv_macs, r.top1_raw,
                                group="Tucker-2, data-free, BN statistics not re-estimated"))
    return plot_accuracy_vs_macs(points, out / _PLOT_NAME,
                                 title=f"CIFAR-10 ResNet-20 at conv-MAC budgets: top-1 on {n_test} test images")


def run_demo(out_dir: str | os.PathLike[str] = "convfx-demo", *, fast: bool = False, threads: int | None = None,
             progress: bool = False) -> DemoResult:
    """Run the demo, print its tables to stdout and write model, plot and JSON to ``out_dir``.

    For each conv-MAC budget in :data:`TARGETS`, Tucker-2 ranks are allocated by
    ``compress(flops_target=...)`` and the factors are fitted to reproduce each layer's
    outputs on the calibration images (for :data:`MAIN_TARGET` also from the weights
    alone, for comparison); BN statistics are then re-estimated on those images. At
    :data:`AUTO_TARGET` ``method="auto"`` (tucker or cp per layer) is shown too.
    ``fast`` uses :data:`FAST_TARGETS` and 500 test images, without the auto row.
    """
    from .api import analyze
    from .train import evaluate

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_threads = choose_threads(threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        torch.manual_seed(0)
        d = _load(fast)
        print(f"convfx demo: pretrained CIFAR-10 ResNet-20 (bundled), {d.n_test} test images, "
              f"{d.n_calib} calibration images (labels unused), {n_threads} CPU thread(s)")

        t0 = time.perf_counter()
        base = analyze(d.model, d.example)
        ev = evaluate(d.model, d.test_loader, progress=progress, desc="original")
        rows = [DemoRow("original", "-", None, base.conv_macs, base.params, ev["top1"], ev["top5"], ev["top1"],
                        time.perf_counter() - t0, "-")]
        print(f"original: top-1 {ev['top1']:.2f}%, top-5 {ev['top5']:.2f}%, conv MACs {base.conv_macs / 1e6:.2f}M")

        main_gm: torch.fx.GraphModule | None = None
        d.base_macs = base.conv_macs
        for s in _settings(fast):
            row, gm = _compress_row(d, s, progress)
            rows.append(row)
            if s == Setting("tucker", MAIN_TARGET, "calibrated"):
                main_gm = gm
        if main_gm is None:  # MAIN_TARGET not among the targets run
            main_gm = gm
        main_rows = [r for r in rows if r.target == MAIN_TARGET and r.method == "tucker"
                     and r.label.endswith("MACs")] or rows[-1:]
        main_label = f"tucker, {main_rows[-1].label.split(' ', 1)[1]}, calibrated"

        print(f"\nPer-layer report, main setting ({main_label}; BN then re-estimated):")
        print(main_gm.convfx_report.to_table())
        print("\nAll settings (BN re-estimated on the calibration images except after recovery; accuracy on the "
              "bundled test images):")
        print(_table(rows, base.conv_macs))
        for r in main_rows:
            if r.top1_raw is not None:
                print(f"{r.label}, {r.fit}: top-1 {r.top1_raw:.2f}% -> {r.top1:.2f}% with BN re-estimation")
        print("MACs: per 32x32 image, 1 multiply-add = 1 (fvcore); GFLOPs = 2 x GMACs.")

        model_path, identical = _save_and_reload(main_gm, d, out)
        plot_path = _plot(rows, d.n_calib, d.n_test, out)

        seconds = time.perf_counter() - t_start
        result = DemoResult(rows, model_path, plot_path, out / _RESULTS_NAME, identical, d.n_test, n_threads, seconds)
        payload = {**asdict(result), "model_path": str(model_path), "plot_path": str(plot_path),
                   "results_path": str(result.results_path),
                   "convention": "MACs per 32x32 image, 1 multiply-add = 1 (fvcore); GFLOPs = 2 x GMACs"}
        result.results_path.write_text(json.dumps(payload, indent=2) + "\n")
        print("\nOutputs:")
        print(f"  compressed model : {model_path}  ({main_label}; convfx.load reproduces its outputs: "
              f"{'yes, bit for bit' if identical else 'NO'})")
        print(f"  plot             : {plot_path}")
        print(f"  results (JSON)   : {result.results_path}")
        print(f"done in {seconds:.1f}s")
        return result
    finally:
        torch.set_num_threads(previous_threads)
