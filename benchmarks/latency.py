"""Real latency of original vs convfx-compressed CNNs, eager and torch.compile, in one run.

Fewer MACs only matter if the factorized network also runs faster. This measures, in the
same process and with interleaved repeats (so drifts in machine load hit every variant
alike), the median latency of the original model and of compressed variants at about 2x
and 3x fewer conv MACs, and reports the realized speedup divided by the MAC reduction
("efficiency": 1.0 means the MAC saving turned fully into time).

    python benchmarks/latency.py --out benchmarks/results/latency_cpu.md
    python benchmarks/latency.py --quick
    python benchmarks/latency.py --device cuda --dtype bf16 --channels-last --out latency_h100.md

Models are torchvision ResNet-18/50 with random weights at 224x224 (latency does not depend
on the weight values). Ranks: ``compress(..., flops_target=1/x)`` when convfx has it (the
conv MACs are then at most 1/x of the original's), else fixed float ranks. Compression itself
runs on the CPU in float32 with one thread (it is set-up, not what is measured); the
variants are then moved to the device and dtype under test.

CPU timings use ``time.perf_counter``; CUDA timings use CUDA events after a synchronize.
One sample is the mean over enough back-to-back calls to last ``--min-sample-ms``; the
table shows the median and the interquartile range (IQR) of ``--repeats`` samples.

OpenMP wait policy. With ``OMP_WAIT_POLICY=PASSIVE`` idle OpenMP threads sleep, so every
parallel region pays a wake-up. On the 2-core dev machine that costs about 0.13 ms per conv
call: an 8->8 1x1 conv on a 7x7 map takes 0.138 ms under PASSIVE and 0.013 ms under the
runtime default. The cost grows with the number of ops, not with their work, so it weighs on
factorized models (up to three convs per layer) at batch 1. For Tucker 2x under torch.compile
at batch 1, speedup / MAC reduction went from 0.65-0.74 under PASSIVE to 0.74-0.81 under the
default policy in the same sitting, and from 0.70-0.74 to 0.83-0.87 with ``rank_multiple=16``
(``results/latency_cpu_compile_tucker.md``). Each CPU table records this per-call cost
(``tiny conv call``) under its policy.

The default (unset) is what torch users get, and the committed tables use it unless they say
otherwise. ``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch starts. It is for a
shared, loaded CPU (load average above the core count), where threads that spin-wait at
barriers fight over cores and can make 2-thread runs many times slower. The table records the
policy and the load.
"""
from __future__ import annotations

import os
import sys

if "--omp-passive" in sys.argv:  # must be set before the OpenMP runtime starts (import torch)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

import convfx  # noqa: E402

# Fallback float ranks when compress has no flops_target (approximate; the table shows the
# realized reduction either way). Keyed by (method, target reduction).
FLOAT_RANKS = {("tucker", 2.0): 0.55, ("tucker", 3.0): 0.42, ("cp", 2.0): 0.45, ("cp", 3.0): 0.3}


@dataclass
class Variant:
    """One model to time: the original or a compressed copy."""

    label: str
    module: nn.Module
    reduction: float = 1.0  # conv-MAC reduction (fvcore MACs), 1.0 for the original
    ranks: str = ""
    compress_s: float = 0.0


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)  # ms per call

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, n: int) -> float:
    """Mean ms per call over ``n`` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def tiny_conv_ms() -> float:
    """Median ms of one call of an 8->8 1x1 conv on a 7x7 map: the fixed cost every conv pays.

    Why: it shows the OpenMP wake-up cost of the run's wait policy (see the module docstring).
    """
    conv = nn.Conv2d(8, 8, 1, bias=False).eval()
    x = torch.randn(1, 8, 7, 7)
    cpu = torch.device("cpu")
    with torch.no_grad():
        time_calls(lambda: conv(x), cpu, 20)  # warm-up
        return statistics.median(time_calls(lambda: conv(x), cpu, 1) for _ in range(200))


def compress_kwargs(method: str, target: float, multiple: int) -> dict[str, Any]:
    params = inspect.signature(convfx.compress).parameters
    kw: dict[str, Any] = {"method": method}
    if "flops_target" in params:
        kw["flops_target"] = 1.0 / target
    else:
        kw["rank"] = FLOAT_RANKS[(method, target)]
    if multiple > 1:
        if "rank_multiple" not in params:
            raise SystemExit("--rank-multiples: this convfx has no compress(rank_multiple=...)")
        kw["rank_multiple"] = multiple
    if "progress" in params:
        kw["progress"] = False
    return kw


def build_variants(name: str, args: argparse.Namespace) -> list[Variant]:
    """The original and every compressed variant of one model, on the CPU in float32."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    out = [Variant("original", model)]
    specs: list[tuple[str, float, int]] = [(m, t, 1) for m in args.methods for t in args.targets]
    specs += [("tucker", args.targets[0], k) for k in args.rank_multiples if "tucker" in args.methods]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded LAPACK can crawl on a busy machine; set-up only
    try:
        for method, target, multiple in specs:
            kw = compress_kwargs(method, target, multiple)
            t0 = time.perf_counter()
            gm = convfx.compress(model, x, **kw)
            dt = time.perf_counter() - t0
            rep = gm.convfx_report
            label = f"{method} {target:g}x" + (f" mult{multiple}" if multiple > 1 else "")
            rk = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in kw.items() if k not in ("method", "progress"))
            out.append(Variant(label, gm, rep.conv_reduction, rk, dt))
            print(f"  compressed {name} {label}: conv-MAC reduction {rep.conv_reduction:.2f}x, "
                  f"{len(rep.factorized)} layers, {dt:.1f}s", flush=True)
    finally:
        torch.set_num_threads(threads)
    return out


def prepare(module: nn.Module, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    module = module.to(device=device, dtype=dtype)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module.eval()


def make_callable(module: nn.Module, x: torch.Tensor, mode: str, args: argparse.Namespace) -> Callable[[], Any]:
    if mode == "eager":
        return lambda: module(x)
    compiled = torch.compile(module, backend="inductor", dynamic=False,
                             mode=None if args.compile_mode == "default" else args.compile_mode)
    return lambda: compiled(x)


def bench_group(variants: list[Variant], x: torch.Tensor, mode: str, args: argparse.Namespace,
                device: torch.device) -> tuple[list[Timing], list[float]]:
    """Warm every variant up (compiling if needed), then time them interleaved."""
    fns: list[Callable[[], Any]] = []
    inner: list[int] = []
    setup_s: list[float] = []
    for v in variants:
        fn = make_callable(v.module, x, mode, args)
        t0 = time.perf_counter()
        fn()
        sync(device)
        setup_s.append(time.perf_counter() - t0)
        for _ in range(args.warmup):
            fn()
        one = max(time_calls(fn, device, 1), 1e-3)
        inner.append(max(1, math.ceil(args.min_sample_ms / one)))
        fns.append(fn)
    timings = [Timing() for _ in variants]
    for _ in range(args.repeats):
        for fn, n, t in zip(fns, inner, timings):
            t.samples.append(time_calls(fn, device, n))
    return timings, setup_s


def fmt(t: Timing) -> str:
    return f"{t.median:.2f} ({t.iqr:.2f})"


def run(args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # let cuDNN pick kernels for the odd factor shapes
    rows: list[list[str]] = []
    notes: list[str] = []
    for name in args.models:
        print(f"[{name}] compressing ...", flush=True)
        variants = build_variants(name, args)
        for v in variants:
            v.module = prepare(v.module, args, device, dtype)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for mode in args.modes:
                torch._dynamo.reset()
                with torch.inference_mode():
                    timings, setup_s = bench_group(variants, x, mode, args, device)
                base = timings[0]
                for v, t, s in zip(variants[1:], timings[1:], setup_s[1:]):
                    speedup = base.median / t.median
                    rows.append([name, str(batch), mode, v.label, v.ranks, f"{v.reduction:.2f}x", fmt(base), fmt(t),
                                 f"{speedup:.2f}x", f"{speedup / v.reduction:.2f}"])
                    print(" | ".join(rows[-1]), flush=True)
                if mode == "compile":
                    notes.append(f"{name} batch {batch}: first call incl. compile (inductor's on-disk cache "
                                 "makes repeated runs fast) "
                                 + ", ".join(f"{v.label} {s:.0f}s" for v, s in zip(variants, setup_s)))
                gc.collect()
        notes.append(f"{name}: compress time (1 thread) "
                     + ", ".join(f"{v.label} {v.compress_s:.0f}s" for v in variants[1:]))
        del variants
        torch._dynamo.reset()
        gc.collect()
    return rows, notes


HEAD = ["model", "batch", "mode", "variant", "compress args", "conv-MAC red.", "original ms (IQR)",
        "compressed ms (IQR)", "speedup", "speedup / MAC red."]


def markdown(rows: list[list[str]], notes: list[str], args: argparse.Namespace, meta: dict[str, str]) -> str:
    lines = ["# Latency: original vs convfx-compressed", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", ("Times are medians of the interleaved samples, IQR in parentheses. `speedup` = "
                   "original / compressed median; `speedup / MAC red.` = 1.0 when the conv-MAC reduction "
                   "(fvcore count) turns fully into time."), ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the timed runs")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--modes", default="eager,compile", help="eager and/or compile (inductor)")
    p.add_argument("--methods", default="tucker,cp")
    p.add_argument("--targets", default="2,3", help="conv-MAC reductions to aim for")
    p.add_argument("--rank-multiples", default="8,16",
                   help="extra Tucker variants at the first target with ranks rounded to these ('' for none)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-sample-ms", type=float, default=100.0)
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (e.g. max-autotune)")
    p.add_argument("--freezing", action="store_true",
                   help="inductor freezing (weights as constants: BN folded into the preceding conv, "
                        "oneDNN weight prepacking), for original and compressed alike")
    p.add_argument("--quick", action="store_true", help="ResNet-18, batch 1, Tucker 2x only, 5 repeats")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE (use on a shared, loaded CPU; see the module docstring)")
    p.add_argument("--out", default=None, help="write a markdown table here")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.methods, args.targets, args.rank_multiples = "resnet18", "1", "tucker", "2", ""
        args.repeats = min(args.repeats, 5)

    def split(s: str) -> list[str]:
        return [t.strip() for t in s.split(",") if t.strip()]

    args.models = split(args.models)
    args.batches = [int(b) for b in split(args.batches)]
    args.modes = split(args.modes)
    args.methods = split(args.methods)
    args.targets = [float(t) for t in split(args.targets)]
    args.rank_multiples = [int(k) for k in split(args.rank_multiples)]
    if not set(args.modes) <= {"eager", "compile"}:
        p.error("--modes: expected eager and/or compile")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    device = torch.device(args.device)
    meta = {
        "command": "`" + shlex.join(["python", *sys.argv]) + "`",
        "device": device_name(device) + (f" ({args.threads} threads)" if device.type == "cpu" else ""),
        "torch": f"{torch.__version__}, torchvision {torchvision.__version__}, convfx {convfx.__version__}",
        "threads": str(torch.get_num_threads()),
        "dtype / layout": f"{args.dtype} / {'channels_last' if args.channels_last else 'contiguous (NCHW)'}",
        "load average at start (1/5/15 min)": load_average(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: runtime default)"),
        "samples": f"{args.repeats} interleaved repeats after {args.warmup} warm-up calls, "
                   f">= {args.min_sample_ms:g} ms per sample",
        "torch.compile": f"inductor, dynamic=False, mode={args.compile_mode}"
                         + (", freezing=True" if args.freezing else ""),
        "input": f"random {args.size}x{args.size} images; random-init torchvision weights",
    }
    if device.type == "cpu":
        meta["tiny conv call (8->8 1x1 on 7x7, median)"] = f"{tiny_conv_ms():.3f} ms"
        if os.getloadavg()[0] > (os.cpu_count() or 1):
            meta["warning"] = (f"the machine was busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): "
                               "absolute times are inflated and noisy; compare within a row")
    print("\n".join(f"{k}: {v}" for k, v in meta.items()), flush=True)
    t0 = time.perf_counter()
    rows, notes = run(args)
    meta["load average at end"] = load_average()
    meta["wall time"] = f"{time.perf_counter() - t0:.0f} s"
    text = markdown(rows, notes, args, meta)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
