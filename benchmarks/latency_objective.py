"""The latency objective next to the MAC objective, both measured afresh in one run.

For each model, batch, backend and target f, two compressions of the same model:

* **MAC objective**: ``compress(model, x, flops_target=f)`` (conv MACs ≤ f × the original's);
* **latency objective**: ``compress(model, x, latency_target=f, latency_backend=backend)``
  (measured time ≈ f × the original's, on this machine),

then the original and both compressed models are timed again side by side, interleaved, in
this process (``passes.latency.time_models``), and each row gives that fresh measured
speedup with the conv-MAC reduction, the compressor's own figure, its compress time and
whether its profile cache was cold. The speedup in the table is never the compressor's
own number.

    python benchmarks/latency_objective.py --out benchmarks/results/latency_objective_cpu.md
    python benchmarks/latency_objective.py --models resnet18 --batches 1 --backends eager --targets 0.5 --quick

Models are torchvision ResNet-18/50 with random weights at 224x224 (time does not depend on
weight values; without calibration both objectives allocate from the weight spectra).
``--cache DIR`` sets the latency profile cache (default: a fresh temporary folder, so that
every cell starts cold and its compress time is the cold-cache time; ``--warm`` re-runs the
latency compress once more on the now-warm cache and reports that time too).
MACs: fvcore's count, 1 multiply-add = 1.
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

import convfx
from passes.latency import device_name, time_models

HEAD = ["model", "batch", "backend", "target f", "objective", "conv-MAC red.", "original ms (IQR)",
        "compressed ms (IQR)", "measured speedup", "vs 1/f", "compressor's figure", "compress s", "note"]


def _fmt(t: Any) -> str:
    return f"{t.median * 1e3:.2f} ({t.spread * 1e3:.2f})"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run(args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows: list[list[str]] = []
    notes: list[str] = []
    for name in args.models:
        model = getattr(torchvision.models, name)().eval().to(device=device, dtype=dtype)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for backend in args.backends:
                for f in args.targets:
                    torch._dynamo.reset()
                    t0 = time.perf_counter()
                    macs = convfx.compress(model, x, flops_target=f, rank_multiple=args.rank_multiple,
                                           progress=False)
                    macs_s = time.perf_counter() - t0
                    cache = args.cache or tempfile.mkdtemp(prefix="convfx-lat-")
                    os.environ["CONVFX_CACHE_DIR"] = cache
                    t0 = time.perf_counter()
                    lat = convfx.compress(model, x, latency_target=f, latency_backend=backend,
                                          rank_multiple=args.rank_multiple, progress=False)
                    lat_s = time.perf_counter() - t0
                    warm = ""
                    if args.warm:
                        t0 = time.perf_counter()
                        convfx.compress(model, x, latency_target=f, latency_backend=backend,
                                        rank_multiple=args.rank_multiple, progress=False)
                        warm = f"warm-cache compress {time.perf_counter() - t0:.1f} s"
                    torch._dynamo.reset()
                    t = time_models({"original": model, "macs": macs, "latency": lat}, (x,), backend,
                                    warmup=args.warmup, rounds=args.rounds, device=device)
                    o = t["original"]
                    info = lat.convfx_report.latency or {}
                    for label, gm, secs, own, note in (
                            ("MACs (flops_target)", macs, macs_s, "-", ""),
                            ("latency (latency_target)", lat, lat_s,
                             f"{info.get('measured_speedup', float('nan')):.2f}x"
                             + ("" if info.get("reached") else " (not reached)"),
                             "; ".join(filter(None, [f"{len(info.get('rounds', []))} round(s)", warm])))):
                        c = t[label.split()[0].lower()]
                        sp = o.median / c.median
                        rows.append([name, str(batch), backend, f"{f:g}", label,
                                     f"{gm.convfx_report.conv_reduction:.2f}x", _fmt(o), _fmt(c), f"{sp:.2f}x",
                                     f"{sp * f:.2f}", own, f"{secs:.1f}", note])
                        print(" | ".join(rows[-1]), flush=True)
                    del macs, lat
                    gc.collect()
        del model
        gc.collect()
    return rows, notes


def markdown(rows: list[list[str]], notes: list[str], meta: dict[str, str]) -> str:
    lines = ["# Latency objective vs MAC objective, measured side by side", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "`measured speedup` = original / compressed median, timed afresh after both compressions, "
              "interleaved in this process; `vs 1/f` = measured speedup × f (1.00 = exactly the asked speed). "
              "`compressor's figure` = the speedup the latency objective measured while compressing (its "
              "report). `compress s` = wall time of that compress call (cold profile cache unless said). "
              "MACs: fvcore, 1 multiply-add = 1.", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--backends", default="eager,inductor")
    p.add_argument("--targets", default="0.5,0.67")
    p.add_argument("--rank-multiple", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cache", default=None, help="latency profile cache folder (default: a fresh one per cell)")
    p.add_argument("--warm", action="store_true", help="also time a second latency compress on the warm cache")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    def split(s: str) -> list[str]:
        return [t.strip() for t in s.split(",") if t.strip()]

    args.models, args.backends = split(args.models), split(args.backends)
    args.batches = [int(b) for b in split(args.batches)]
    args.targets = [float(t) for t in split(args.targets)]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    meta = {
        "command": "`" + shlex.join(["python", *sys.argv]) + "`",
        "device": device_name(device),
        "torch": f"{torch.__version__}, torchvision {torchvision.__version__}, convfx {convfx.__version__}",
        "dtype / layout": f"{args.dtype} / {'channels_last' if args.channels_last else 'contiguous'}",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: runtime default)"),
        "load average at start": _load(),
        "timing": f"{args.rounds} interleaved rounds after {args.warmup} warm-up calls (passes.latency)",
    }
    print("\n".join(f"{k}: {v}" for k, v in meta.items()), flush=True)
    t0 = time.perf_counter()
    rows, notes = run(args)
    meta["load average at end"] = _load()
    meta["wall time"] = f"{time.perf_counter() - t0:.0f} s"
    text = markdown(rows, notes, meta)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
