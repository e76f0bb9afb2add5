"""Accuracy at equal measured speed: the latency objective against the MAC objective.

For CIFAR-10 ResNet-56 (batch 128) and EfficientNet-Lite0 (batch 1, ``method="id"``), both
calibration only (no training, labels never seen by the compressor):

* the **latency objective** compresses to each ``--speedups`` s with ``latency_target=1/s``;
* the **MAC objective** compresses at several ``flops_target`` values spanning the same range;

then every model is timed afresh, interleaved with the original in this process
(``passes.latency.time_models``), and evaluated on the report images. Top-1 of the MAC
objective at the latency objective's *measured* speedup is interpolated linearly between
its two nearest measured points (both objectives' points are in the table and the plot),
so the comparison is at equal measured speed, not at equal MACs.

    python benchmarks/latency_accuracy.py --shared-data ../shared/data --out-dir benchmarks/results

Data: CIFAR calibration = 1000 train-zip images (seed 0), report = the 10,000 test images;
Lite0 calibration = 300 random imagenet-val-1300 images, report = 700 others (the random split
of ``benchmarks/accuracy.py``, its selection images left out). MACs: fvcore, 1 multiply-add = 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import convfx  # noqa: E402
from convfx import zoo  # noqa: E402
from convfx.data import imagenet  # noqa: E402
from passes.latency import device_name, time_models  # noqa: E402

# benchmarks/accuracy.py, beside this script (a script's folder is on its import path): the same data code
from accuracy import ImageTensors, decode_cifar, lite_splits  # noqa: E402


def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x through (x, y) points; None outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return None


def _evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return convfx.evaluate(model, iter(batches), progress=False)["top1"]


def study(name: str, original: torch.nn.Module, x: torch.Tensor, calib: list[torch.Tensor],
          report: list[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace, method: str,
          flops_targets: list[float], speedups: list[float]) -> dict[str, Any]:
    """Both objectives on one model; every point timed afresh beside the original and evaluated."""
    points: list[dict[str, Any]] = []
    base = _evaluate(original, report)
    for objective, values in (("macs", flops_targets), ("latency", [1 / s for s in speedups])):
        for v in values:
            kw: dict[str, Any] = ({"flops_target": v} if objective == "macs"
                                  else {"latency_target": v, "latency_backend": args.backend})
            t0 = time.perf_counter()
            gm = convfx.compress(original, x, method=method, calibration=calib, progress=False, **kw)
            secs = time.perf_counter() - t0
            torch._dynamo.reset()
            t = time_models({"original": original, "compressed": gm}, (x,), args.backend, warmup=3,
                            rounds=args.rounds, device=torch.device("cpu"))
            top1 = _evaluate(gm, report)
            rep = gm.convfx_report
            p = {"objective": objective, "value": v, "conv_reduction": rep.conv_reduction,
                 "original_ms": t["original"].median * 1e3, "ms": t["compressed"].median * 1e3,
                 "iqr_ms": t["compressed"].spread * 1e3,
                 "speedup": t["original"].median / t["compressed"].median, "top1": top1,
                 "compress_s": secs, "reached": (rep.latency or {}).get("reached")}
            points.append(p)
            print(name, json.dumps(p), flush=True)
    macs = [(p["speedup"], p["top1"]) for p in points if p["objective"] == "macs"]
    compare = []
    for p in (q for q in points if q["objective"] == "latency"):
        other = _interp(macs, p["speedup"])
        compare.append({"speedup": p["speedup"], "latency_top1": p["top1"], "macs_top1": other,
                        "target": 1 / p["value"]})
    return {"model": name, "original_top1": base, "points": points, "compare": compare}


def cifar(args: argparse.Namespace) -> dict[str, Any]:
    root = args.shared_data
    original = zoo.cifar_resnet(56, checkpoint=root / "cifar10-resnet" / "resnet56-4bfd9763.th").eval()
    norm = zoo.normalization_of(original)
    tr_x, tr_y = decode_cifar(root / "cifar10-jpeg" / "train.zip", "train")
    te_x, te_y = decode_cifar(root / "cifar10-jpeg" / "test.zip", "test")
    order = torch.randperm(len(tr_y), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    calib = [b for b, _ in ImageTensors(tr_x, tr_y, norm).batches(100, cpu, order[:1000])]
    report = list(ImageTensors(te_x, te_y, norm).batches(1000, cpu))
    x = calib[0].new_zeros(args.cifar_batch, 3, 32, 32)
    return study("resnet56", original, x, calib, report, args, "tucker", [0.4, 0.5, 0.6, 0.7, 0.8],
                 args.cifar_speedups)


def lite(args: argparse.Namespace) -> dict[str, Any]:
    original = zoo.efficientnet_lite0(pretrained=True).eval()
    root = args.shared_data / "imagenet-val-1300"
    data = imagenet(root, "val", zoo.normalization_of(original), class_list=root / "wnids.txt")
    calib_set, _, report_set = lite_splits(data, "random", 300, 300)
    calib = [b for b, _ in DataLoader(calib_set, batch_size=50)]
    report = [(b, y) for b, y in DataLoader(report_set, batch_size=100)]
    x = torch.zeros(1, 3, 224, 224)
    return study("efficientnet_lite0", original, x, calib, report, args, "id", [0.7, 0.77, 0.83, 0.9],
                 args.lite_speedups)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(results), 4.2), dpi=130)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, r in zip(axes, results):
        o = r["points"][0]["original_ms"]
        ax.plot([o], [r["original_top1"]], "*", color="black", markersize=13, label="original")
        for objective, style, label in (("macs", "o-", "MAC objective (flops_target)"),
                                        ("latency", "D-", "latency objective (latency_target)")):
            pts = sorted((p["ms"], p["top1"]) for p in r["points"] if p["objective"] == objective)
            if pts:
                ax.plot(*zip(*pts), style, label=label, markersize=5)
        ax.set_xlabel("measured latency (ms, lower is faster)", fontsize=8)
        ax.set_ylabel("top-1 (%)", fontsize=8)
        ax.set_title(r["model"], fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def markdown(results: list[dict[str, Any]], meta: dict[str, str]) -> str:
    lines = ["# Accuracy at equal measured speed: latency objective vs MAC objective", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    for r in results:
        lines += [f"## {r['model']} (original top-1 {r['original_top1']:.2f})", "",
                  "| objective | target | conv-MAC red. | original ms | compressed ms (IQR) | measured speedup | "
                  "top-1 | compress s | reached |", "|---|---|---|---|---|---|---|---|---|"]
        for p in r["points"]:
            lines.append(f"| {p['objective']} | {p['value']:.3g} | {p['conv_reduction']:.2f}x | {p['original_ms']:.2f} | "
                         f"{p['ms']:.2f} ({p['iqr_ms']:.2f}) | {p['speedup']:.2f}x | {p['top1']:.2f} | "
                         f"{p['compress_s']:.0f} | {'' if p['reached'] is None else p['reached']} |")
        lines += ["", "| asked speedup | measured speedup | latency objective top-1 | MAC objective top-1 at that "
                  "measured speedup (interpolated) | difference |", "|---|---|---|---|---|"]
        for c in r["compare"]:
            m = c["macs_top1"]
            other = "outside the measured range" if m is None else f"{m:.2f}"
            diff = "" if m is None else f"{c['latency_top1'] - m:+.2f}"
            lines.append(f"| {c['target']:.2f}x | {c['speedup']:.2f}x | {c['latency_top1']:.2f} | {other} | {diff} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared-data", type=Path, required=True)
    ap.add_argument("--models", default="resnet56,efficientnet_lite0")
    ap.add_argument("--backend", default="eager", choices=("eager", "inductor"))
    ap.add_argument("--cifar-batch", type=int, default=128)
    ap.add_argument("--cifar-speedups", type=lambda s: [float(v) for v in s.split(",")], default=[1.5, 2.0])
    ap.add_argument("--lite-speedups", type=lambda s: [float(v) for v in s.split(",")], default=[1.2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {"command": "`" + shlex.join(["python", *sys.argv]) + "`", "device": device_name(torch.device("cpu")),
            "backend": args.backend, "torch": torch.__version__,
            "load average at start": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    t0 = time.perf_counter()
    results = []
    for m in args.models.split(","):
        results.append(cifar(args) if m == "resnet56" else lite(args))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        meta["wall time"] = f"{time.perf_counter() - t0:.0f} s"
        meta["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        stem = args.out_dir / f"latency_accuracy_{args.tag}"
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(results, meta))
        plot(results, stem.with_suffix(".png"), f"top-1 vs measured latency ({meta['device']}, {args.backend})")
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
