"""Whole-model compression time and peak memory: ResNet-50, Tucker-2 + VBMF and CP on every 3x3.

    python benchmarks/compress_speed.py --out benchmarks/results/compress_speed_cpu.md
    python benchmarks/compress_speed.py --device cuda --no-tensorly --out compress_speed_cuda.md

Times include tracing, shape propagation, both fvcore analyses, rank selection, the
decompositions and the rewrite: everything ``convfx.compress`` does.  The model is
torchvision's ResNet-50 with its random initialisation (``torch.manual_seed(0)``; no
checkpoint is downloadable here).

Afterwards, for both Tucker settings, every layer that convfx factorised with Tucker-2 is
decomposed again at the same ranks by convfx's ``tucker2`` alone and by tensorly's
``partial_tucker`` (modes [0, 1], pytorch backend, float32 weights as given, its
defaults otherwise), interleaved layer by layer, each timed and scored by
``||W - W_hat|| / ||W||`` in float64.  tensorly (``pip install tensorly==0.10.0``) is a
benchmark-only dependency; ``--no-tensorly`` skips that part.  The CP setting also lists
every layer's relative error.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Passive OpenMP waiting: on a CPU shared with other jobs, spinning threads make small
# parallel ops cost milliseconds (see benchmarks/decompose_speed.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torchvision  # noqa: E402

import convfx  # noqa: E402
from passes.decompose import relative_error, tucker2  # noqa: E402

SETTINGS = ("tucker-vbmf", "tucker-flops", "cp")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Smallest wall time of ``repeats`` calls (synchronised), and the last result."""
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def tucker_vs_tensorly(model: torch.nn.Module, report: Any, device: torch.device,
                       repeats: int = 2) -> list[dict[str, Any]]:
    """convfx ``tucker2`` vs tensorly ``partial_tucker`` on every Tucker layer of ``report``."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    tl.set_backend("pytorch")
    modules = dict(model.named_modules())

    def run_tl(w: torch.Tensor, ranks: tuple[int, int]) -> Any:
        with warnings.catch_warnings():  # "n_eigenvecs larger than min(matrix.shape)" etc.
            warnings.simplefilter("ignore")
            return partial_tucker(w, rank=list(ranks), modes=[0, 1], init="svd", random_state=0)

    warm = torch.randn(8, 8, 3, 3, device=device)  # lazy initialisation outside the timings
    tucker2(warm, (2, 2))
    run_tl(warm, (2, 2))
    rows = []
    for layer in report.layers:
        if layer.method != "tucker":
            continue
        w = modules[layer.fqn].weight.detach()
        ranks = tuple(layer.ranks)
        ours_s, (core, u_out, u_in) = _best_time(lambda w=w, r=ranks: tucker2(w, r), repeats, device)
        ours_hat = torch.einsum("abhw,oa,ib->oihw", core.double(), u_out.double(), u_in.double())
        tl_s, ((tl_core, tl_factors), tl_errors) = _best_time(lambda w=w, r=ranks: run_tl(w, r), repeats, device)
        tl_hat = tl.tenalg.multi_mode_dot(tl_core.double(), [f.double() for f in tl_factors], modes=[0, 1])
        norm2 = float(w.double().pow(2).sum())
        rows.append(dict(
            fqn=layer.fqn, shape=tuple(w.shape), ranks=ranks, norm2=norm2,
            ours_s=ours_s, ours_err=relative_error(w, ours_hat),
            tl_s=tl_s, tl_err=relative_error(w, tl_hat), tl_iters=len(tl_errors),
        ))
    return rows


def _pooled(rows: list[dict[str, Any]], key: str) -> float:
    """sqrt(sum ||W - W_hat||^2 / sum ||W||^2) over the layers."""
    num = sum(r[key] ** 2 * r["norm2"] for r in rows)
    den = sum(r["norm2"] for r in rows)
    return math.sqrt(num / den) if den > 0 else 0.0


def tucker_table(rows: list[dict[str, Any]], compress_s: float) -> list[str]:
    ours_t = sum(r["ours_s"] for r in rows)
    tl_t = sum(r["tl_s"] for r in rows)
    lower = sum(r["ours_err"] <= r["tl_err"] + 1e-12 for r in rows)
    out = [
        f"Totals over {len(rows)} Tucker-2 layers: convfx `tucker2` **{ours_t:.3f} s**, tensorly `partial_tucker` "
        f"**{tl_t:.3f} s** ({tl_t / max(ours_t, 1e-12):.1f}x convfx's time); whole `compress()` for this setting "
        f"{compress_s:.2f} s.",
        f"Relative error, sum over layers: convfx {sum(r['ours_err'] for r in rows):.4f}, tensorly "
        f"{sum(r['tl_err'] for r in rows):.4f}; pooled sqrt(sum ||W-W_hat||^2 / sum ||W||^2): convfx "
        f"{_pooled(rows, 'ours_err'):.5f}, tensorly {_pooled(rows, 'tl_err'):.5f}; convfx's error <= tensorly's "
        f"in {lower} of {len(rows)} layers.",
        "",
        "| layer | shape | ranks (out, in) | convfx s | convfx rel err | tensorly s (iters) | tensorly rel err |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['fqn']} | {'x'.join(map(str, r['shape']))} | {r['ranks'][0]}, {r['ranks'][1]} "
            f"| {r['ours_s']:.4f} | {r['ours_err']:.5f} | {r['tl_s']:.4f} ({r['tl_iters']}) | {r['tl_err']:.5f} |"
        )
    return out


def cp_layer_table(report: Any) -> list[str]:
    layers = [r for r in report.layers if r.method == "cp"]
    errs = [float(r.rel_error) for r in layers]
    out = [
        f"Per-layer relative error of the CP setting (sum {sum(errs):.4f}, mean {sum(errs) / max(len(errs), 1):.5f}):",
        "",
        "| layer | shape | CP rank | rel err |",
        "|---|---|---:|---:|",
    ]
    for r in layers:
        out.append(f"| {r.fqn} | {'x'.join(map(str, r.shape))} | {r.ranks[0]} | {float(r.rel_error):.5f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cp-rank", type=float, default=0.33, help="float CP rank for every 3x3 conv")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS), help="which compress runs")
    ap.add_argument("--no-tensorly", action="store_true", help="skip the partial_tucker comparison")
    ap.add_argument("--tl-repeats", type=int, default=2, help="best of this many calls per layer and library")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(device)
    x = torch.randn(1, 3, 224, 224, device=device)
    three = lambda m, n: getattr(m, "kernel_size", None) == (3, 3)  # noqa: E731
    all_settings = {
        "tucker-vbmf": ("tucker, rank=vbmf", dict(method="tucker", rank="vbmf")),
        "tucker-flops": ("tucker, flops_target=0.5", dict(method="tucker", flops_target=0.5)),
        "cp": (f"cp on every 3x3 (rank={args.cp_rank})", dict(method="cp", rank=args.cp_rank, filter_fn=three)),
    }
    convfx.compress(model, x, rank=1.0, filter_fn=lambda m, n: n == "conv1")  # warm-up (imports, kernels)
    rows, reports, seconds = [], {}, {}
    loads = [os.getloadavg()[0]]
    for key in args.settings:
        name, kw = all_settings[key]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        gm = convfx.compress(model, x, **kw)  # type: ignore[arg-type]
        _sync(device)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        loads.append(os.getloadavg()[0])
        rep = gm.convfx_report
        reports[key], seconds[key] = rep, dt
        peak = (f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU" if device.type == "cuda"
                else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS (process peak so far)")
        rows.append(f"| {name} | {dt:.2f} | {cpu:.1f} | {rep.conv_reduction:.2f}x | {len(rep.factorized)} | {peak} |")
        print(rows[-1], flush=True)
        del gm
    head = ("| setting | compress s (wall) | process CPU s | conv-MAC reduction | layers factorized | peak memory |\n"
            "|---|---|---|---|---|---|")
    lines = [head, *rows, ""]

    if "cp" in reports:
        lines += [*cp_layer_table(reports["cp"]), ""]
    tucker_keys = [k for k in ("tucker-vbmf", "tucker-flops") if k in reports]
    if tucker_keys and not args.no_tensorly:
        try:
            import tensorly
        except ImportError:
            lines += ["tensorly is not installed: no partial_tucker comparison.", ""]
        else:
            lines += [
                f"## Tucker-2: convfx `tucker2` vs tensorly {tensorly.__version__} `partial_tucker` at the same ranks",
                "",
                "Same layers and ranks as the compress() run of each setting; same float32 weight to both. convfx: "
                "`passes.decompose.tucker2(W, ranks)` (HOSVD start, up to 5 HOOI subspace steps, float64 inside) -- "
                "the decomposition `compress()` runs for each Tucker layer. tensorly: "
                "`partial_tucker(W, rank=ranks, modes=[0, 1], init='svd', random_state=0)` with its defaults "
                "(n_iter_max=100, tol=1e-4), pytorch backend, float32. Layers interleaved; each time is the best of "
                f"{args.tl_repeats} calls; errors `||W - W_hat|| / ||W||` in float64.",
                "",
            ]
            for key in tucker_keys:
                name = all_settings[key][0]
                t_rows = tucker_vs_tensorly(model, reports[key], device, repeats=args.tl_repeats)
                loads.append(os.getloadavg()[0])
                table = tucker_table(t_rows, seconds[key])
                print("\n".join(table), flush=True)
                lines += [f"### {name}", "", *table, ""]
    print("\n".join(lines))
    if args.out is not None:
        cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
        text = "\n".join([
            "# convfx.compress time on ResNet-50 (random init, 1x3x224x224)", "",
            f"Command: `OMP_WAIT_POLICY=PASSIVE {cmd}`", "",
            f"Device: {_device_name(device)}; torch {torch.__version__}; load average (1 min) at start and after "
            f"each part: {', '.join(f'{v:.1f}' for v in loads)}.", "",
            "Includes tracing, shape propagation, two fvcore analyses, rank selection, decompositions and the "
            "rewrite. *process CPU s* is the user + system CPU time of this process over the call (all its "
            "threads), which other jobs on a shared CPU inflate much less than the wall time.", "", *lines])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
