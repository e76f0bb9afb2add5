"""Whole-model compression time and peak memory: ResNet-50, Tucker-2 + VBMF and CP on every 3x3.

    python benchmarks/compress_speed.py --out benchmarks/results/compress_speed_cpu.md
    python benchmarks/compress_speed.py --device cuda --out compress_speed_cuda.md

Times include tracing, shape propagation, both fvcore analyses, rank selection, the
decompositions and the rewrite: everything ``convfx.compress`` does.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torchvision  # noqa: E402

import convfx  # noqa: E402


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cp-rank", type=float, default=0.33, help="float CP rank for every 3x3 conv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(device)
    x = torch.randn(1, 3, 224, 224, device=device)
    rows = []
    settings = [
        ("tucker, rank=vbmf", dict(method="tucker", rank="vbmf")),
        ("tucker, flops_target=0.5", dict(method="tucker", flops_target=0.5)),
        (f"cp on every 3x3 (rank={args.cp_rank})", dict(method="cp", rank=args.cp_rank,
                                                       filter_fn=lambda m, n: getattr(m, "kernel_size", None) == (3, 3))),
    ]
    convfx.compress(model, x, rank=1.0, filter_fn=lambda m, n: n == "conv1")  # warm-up (imports, kernels)
    for name, kw in settings:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        gm = convfx.compress(model, x, **kw)  # type: ignore[arg-type]
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rep = gm.convfx_report
        peak = (f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU" if device.type == "cuda"
                else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS (process peak so far)")
        rows.append(f"| {name} | {dt:.2f} | {rep.conv_reduction:.2f}x | {len(rep.factorized)} | {peak} |")
        print(rows[-1], flush=True)
        del gm
    head = "| setting | compress s | conv-MAC reduction | layers factorized | peak memory |\n|---|---|---|---|---|"
    table = "\n".join([head] + rows)
    print(table)
    if args.out is not None:
        cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        text = "\n".join([
            "# convfx.compress time on ResNet-50 (random init, 1x3x224x224)", "",
            f"Command: `{cmd}`", "",
            f"Device: {_device_name(device)}; torch {torch.__version__}; load average {load:.1f}.", "",
            "Includes tracing, shape propagation, two fvcore analyses, rank selection, decompositions and the "
            "rewrite.", "", table, ""])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
