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

_PLOT_NAME = "demo_accuracy_vs_macs.png"
_MODEL_NAME = "demo_resnet20_tucker.pt"
_RESULTS_NAME = "demo_results.json"
_BN_BATCHES = 5  # x 100 images = the whole calibration set
_EVAL_BATCH = 250


@dataclass
class DemoRow:
    """One model in the totals table (MACs: fvcore, 1 multiply-add = 1, per 32x32 image).

    ``top1``/``top5`` are measured after BN re-estimation; ``top1_raw`` before it (only
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

    head = ["model", "factors fit", "conv MACs", "conv GFLOPs", "reduction", "params", "top-1 %", "top-5 %"]
    body = [[r.label, r.fit, format_count(r.conv_macs), f"{2 * r.conv_macs / 1e9:.4f}",
             f"{base_macs / max(r.conv_macs, 1):.2f}x", format_count(r.params), f"{r.top1:.2f}", f"{r.top5:.2f}"]
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


def _load(fast: bool) -> _Data:
    from . import zoo
    from .data import demo_data, make_loader, split_dataset

    model = zoo.demo_model()
    test, calib = demo_data(zoo.normalization_of(model))
    if fast:
        (test,) = split_dataset(test, [500], seed=0)
    return _Data(model, make_loader(test, _EVAL_BATCH, shuffle=False), make_loader(calib, 100, shuffle=False),
                 len(test), len(calib), torch.zeros(1, 3, 32, 32))  # type: ignore[arg-type]


def _settings(fast: bool) -> list[tuple[str, float, str]]:
    """(method, conv-MAC budget, fit) of every compressed row, in table order."""
    targets = FAST_TARGETS if fast else TARGETS
    runs = [("tucker", t, fit) for t in targets
            for fit in (("data-free", "calibrated") if t == MAIN_TARGET else ("calibrated",))]
    if not fast:
        runs.append(("auto", AUTO_TARGET, "calibrated"))
    return runs


def _compress_row(d: _Data, method: str, target: float, fit: str, progress: bool
                  ) -> tuple[DemoRow, torch.fx.GraphModule]:
    """Compress to one budget, re-estimate BN on the calibration images, evaluate; print one line."""
    from .api import compress
    from .train import evaluate, recalibrate_bn

    t0 = time.perf_counter()
    label = f"{method} {target:.0%} MACs"
    gm = compress(d.model, d.example, method=method, flops_target=target, progress=False,
                  calibration=d.calib_loader if fit == "calibrated" else None)
    raw = None
    if fit == "data-free":  # what the weights alone give, before and after BN re-estimation
        raw = evaluate(gm, d.test_loader, progress=progress, desc=f"{label} {fit}")["top1"]
    recalibrate_bn(gm, d.calib_loader, _BN_BATCHES)
    ev = evaluate(gm, d.test_loader, progress=progress, desc=f"{label} {fit} +BN")
    rep = gm.convfx_report
    row = DemoRow(label, fit, target, rep.conv_macs_after, rep.params_after, ev["top1"], ev["top5"], raw,
                  time.perf_counter() - t0, method)
    structures = sorted({r.method for r in rep.factorized if r.method})
    print(f"{label}, {fit}: conv MACs {rep.conv_macs_after / 1e6:.2f}M "
          f"({rep.conv_reduction:.2f}x fewer), top-1 {ev['top1']:.2f}% after BN re-estimation"
          + (f" ({raw:.2f}% before)" if raw is not None else "")
          + (f"; structures chosen: {', '.join(structures)}" if method == "auto" else ""))
    return row, gm


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

    groups = {("tucker", "data-free"): ("Tucker-2, data-free + BN re-est.", (6, -14)),
              ("tucker", "calibrated"): (f"Tucker-2, fitted on {n_calib} calibration images + BN re-est.",
                                         (-6, 8)),
              ("auto", "calibrated"): ("method=auto (tucker or cp per layer), calibrated + BN re-est.", (8, -14))}
    points = [Point("original", rows[0].conv_macs, rows[0].top1, reference=True)]
    for r in rows[1:]:
        group, offset = groups[(r.method, r.fit)]
        points.append(Point(f"{r.target:.0%}", r.conv_macs, r.top1, group=group, offset=offset))
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
        for method, target, fit in _settings(fast):
            row, gm = _compress_row(d, method, target, fit, progress)
            rows.append(row)
            if target == MAIN_TARGET and method == "tucker" and fit == "calibrated":
                main_gm = gm
        if main_gm is None:  # MAIN_TARGET not among the targets run
            main_gm = gm
        main_rows = [r for r in rows if r.target == MAIN_TARGET and r.method == "tucker"] or rows[-1:]
        main_label = f"tucker, {main_rows[-1].label.split(' ', 1)[1]}, calibrated"

        print(f"\nPer-layer report, main setting ({main_label}; BN then re-estimated):")
        print(main_gm.convfx_report.to_table())
        print("\nAll settings (BN re-estimated on the calibration images; accuracy on the bundled test images):")
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
