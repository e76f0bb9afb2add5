"""Speed and accuracy of convfx's decompositions against reference implementations.

Part ``cp``: :func:`passes.cp.cp_als` against ``tensorly.decomposition.parafac``
(pytorch backend) at identical ranks on 3x3 conv kernels with ResNet-50's shapes,
for a kaiming-initialised weight and a structured "trained-like" weight.

    # what made results/decompose_speed.md (about 12-15 min on 2 shared cores):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decompose_speed.py --heavy-tl-iter-max 25 --heavy-from 16777216
    # optional: the heaviest case with tensorly uncapped (about 7 min), as an extra section
    python benchmarks/decompose_speed.py --sizes 512 --ranks 256 --kinds kaiming --append \
        --output benchmarks/results/decompose_speed.md --title "Heaviest case again, tensorly uncapped ..."
    python benchmarks/decompose_speed.py --quick    # small subset, prints only, 1-2 min

Uncapped, tensorly needs about 6-7 min per 512x512 case here (all 24 cases: 40+ min).
Only a full default run replaces the results file unless ``--output`` is given.

tensorly (``pip install tensorly==0.10.0``) is a benchmark-only dependency.
"""

from __future__ import annotations

import os
import sys

# On a CPU shared with other jobs, OpenMP threads that spin while waiting for a
# descheduled sibling make every small parallel op cost milliseconds (measured here:
# a 256x256 elementwise product 0.07 ms -> 8 ms with 2 threads).  Passive waiting
# removes that artefact for both libraries; set before torch loads OpenMP.  On an idle
# CPU, --omp-default keeps the runtime's default instead: PASSIVE costs every parallel
# region a thread wake-up (about 0.1 ms here), which weighs on the small kernels.
if "--omp-default" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from passes.cp import cp_als  # noqa: E402

__all__ = [
    "CPRow",
    "kaiming_weight",
    "trained_like_weight",
    "rel_error",
    "time_call",
    "bench_cp_case",
    "fewest_sweeps",
    "run_cp",
    "cp_table",
    "machine_lines",
    "main",
]

RESULTS = Path(__file__).resolve().parent / "results" / "decompose_speed.md"
SIZES = (64, 128, 256, 512)
RANKS = (64, 128, 256)
KINDS = ("kaiming", "trained-like")
QUICK_SIZES = (64, 128)
QUICK_RANKS = (64, 128)
# First sweep budget probed (then doubled) before bisecting for the fewest convfx sweeps
# that match tensorly's error.
MATCH_START = 8


# --------------------------------------------------------------------------- weights


def kaiming_weight(c_out: int, c_in: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    """Freshly initialised conv weight, N(0, 2 / fan_in) (kaiming normal, fan_in mode)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c_out, c_in, k, k, generator=g) * math.sqrt(2.0 / (c_in * k * k))


def trained_like_weight(c_out: int, c_in: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    """A structured stand-in for a trained conv weight (no checkpoints are downloadable here).

    Low multilinear rank (``C/4`` in both channel modes) with power-law decaying channel
    spectra and centre-heavy spatial energy, plus 20% i.i.d. noise; rescaled to the
    kaiming standard deviation.  Its unfoldings show the decaying singular values of
    real trained kernels, which is what makes CP at moderate rank meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    r_out, r_in = max(1, c_out // 4), max(1, c_in // 4)
    d_out = torch.arange(1, r_out + 1, dtype=torch.float64) ** -0.7
    d_in = torch.arange(1, r_in + 1, dtype=torch.float64) ** -0.7
    centre = (k - 1) / 2
    grid = torch.arange(k, dtype=torch.float64) - centre
    spatial = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / max(centre, 1.0) ** 2)
    core = torch.randn(r_out, r_in, k, k, generator=g, dtype=torch.float64)
    core = core * d_out[:, None, None, None] * d_in[None, :, None, None] * spatial
    u = torch.linalg.qr(torch.randn(c_out, r_out, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(c_in, r_in, generator=g, dtype=torch.float64))[0]
    w = torch.einsum("abhw,ia,jb->ijhw", core, u, v)
    w = w / w.std()
    w = w + 0.2 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    return (w / w.std() * math.sqrt(2.0 / (c_in * k * k))).float()


WEIGHTS: dict[str, Callable[[int, int, int, int], torch.Tensor]] = {
    "kaiming": kaiming_weight,
    "trained-like": trained_like_weight,
}


# --------------------------------------------------------------------------- measuring


def rel_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """``||w - approx|| / ||w||`` in float64."""
    w64 = w.double()
    return float(torch.linalg.vector_norm(w64 - approx.double()) / torch.linalg.vector_norm(w64))


def time_call(fn: Callable[[], object], *, repeat_below_s: float = 2.0, max_repeat: int = 3) -> tuple[float, object]:
    """Wall time of ``fn()``; fast calls are repeated and the best time is kept.

    Both libraries get the same treatment, so sub-second cases are not dominated by
    scheduler noise from other jobs sharing the CPU.
    """
    best, out = math.inf, None
    for _ in range(max_repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        if best >= repeat_below_s:
            break
    return best, out


@dataclass
class CPRow:
    kind: str
    shape: tuple[int, ...]
    rank: int
    tl_s: float | None
    tl_err: float | None
    tl_iters: int | None  # iterations tensorly actually ran
    tl_iter_max: int
    ours_s: float
    ours_err: float
    ours_sweeps: int
    match_sweeps: int | None = None
    match_s: float | None = None
    match_err: float | None = None

    @property
    def speedup(self) -> float | None:
        """tensorly time / convfx time, each with its own defaults (and tensorly's cap)."""
        return None if self.tl_s is None else self.tl_s / self.ours_s

    @property
    def per_iter_speedup(self) -> float | None:
        """(tensorly s per iteration) / (convfx s per sweep), set-up costs included."""
        if self.tl_s is None or not self.tl_iters:
            return None
        return (self.tl_s / self.tl_iters) / (self.ours_s / self.ours_sweeps)

    @property
    def match_speedup(self) -> float | None:
        if self.tl_s is None or self.match_s is None:
            return None
        return self.tl_s / self.match_s


def _tensorly_parafac(w: torch.Tensor, rank: int, n_iter_max: int) -> tuple[float, float, int]:
    """Seconds, relative error and iterations of tensorly's ``parafac`` (float32, pytorch backend)."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("pytorch")
    with warnings.catch_warnings():  # "n_eigenvecs larger than min(matrix.shape)" for 3x3 modes
        warnings.simplefilter("ignore")
        seconds, (cp, errors) = time_call(  # type: ignore[misc]
            lambda: parafac(w, rank, n_iter_max=n_iter_max, init="svd", tol=1e-8, random_state=0, return_errors=True)
        )
    return seconds, rel_error(w, tl.cp_to_tensor(cp)), len(errors)


def bench_cp_case(
    kind: str, c: int, rank: int, *, tensorly: bool = True, tl_iter_max: int = 100, match: bool = True
) -> CPRow:
    """One (weight, shape, rank) case: tensorly defaults vs ``cp_als`` defaults (to convergence)."""
    w = WEIGHTS[kind](c, c, 3, 0)
    ours_s, res = time_call(lambda: cp_als(w, rank, damping=0))
    tl_s = tl_err = tl_iters = None
    if tensorly:
        tl_s, tl_err, tl_iters = _tensorly_parafac(w, rank, tl_iter_max)
    row = CPRow(kind, tuple(w.shape), rank, tl_s, tl_err, tl_iters, tl_iter_max, ours_s, res.rel_error, res.n_iter)
    if match and tl_err is not None and res.rel_error <= tl_err:
        sweeps = fewest_sweeps(w, rank, tl_err, res.n_iter)
        row.match_s, r = time_call(lambda: cp_als(w, rank, n_iter_max=sweeps, damping=0))
        row.match_sweeps, row.match_err = r.n_iter, r.rel_error
    return row


def fewest_sweeps(w: torch.Tensor, rank: int, target: float, n_max: int) -> int:
    """Fewest sweeps ``k <= n_max`` with ``cp_als(w, rank, n_iter_max=k).rel_error <= target``.

    Public API only.  ``cp_als`` is deterministic and returns the best iterate of the
    first ``k`` sweeps of one fixed trajectory, so its error does not increase with
    ``k``: double from ``MATCH_START`` until the target is met, then bisect.  ``n_max``
    sweeps must meet the target.
    """

    def ok(k: int) -> bool:
        return cp_als(w, rank, n_iter_max=k, damping=0).rel_error <= target

    lo, hi = 0, min(MATCH_START, n_max)  # lo: known to fail (or 0); hi: candidate
    while hi < n_max and not ok(hi):
        lo, hi = hi, min(2 * hi, n_max)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def run_cp(
    sizes: Sequence[int],
    ranks: Sequence[int],
    kinds: Sequence[str],
    *,
    tensorly: bool = True,
    tl_iter_max: int = 100,
    heavy_tl_iter_max: int | None = None,
    heavy_from: int = 512 * 512 * 256,
    log: Callable[[str], None] = print,
) -> list[CPRow]:
    """All CP cases; ``heavy_tl_iter_max`` caps tensorly where ``C*C*rank >= heavy_from``."""
    rows = []
    for kind in kinds:
        for c in sizes:
            for rank in ranks:
                cap = tl_iter_max
                if heavy_tl_iter_max is not None and c * c * rank >= heavy_from:
                    cap = heavy_tl_iter_max
                row = bench_cp_case(kind, c, rank, tensorly=tensorly, tl_iter_max=cap)
                log(_row_line(row))
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- reporting

NOTES = [
    "How to read it:",
    "",
    "- Both get the same float32 weight. tensorly: `parafac(W, rank, init='svd', tol=1e-8, random_state=0)`",
    "  with its other defaults (n_iter_max=100 unless marked *capped*), pytorch backend, computing in float32.",
    "  convfx: `cp_als(W, rank, damping=0)` (plain least squares, like parafac; the default damping trades",
    "  ~2% error for factors that fine-tune) with its other defaults (n_iter_max=100, tol=1e-6 on the relative change of the",
    "  error, `init='auto'`), float64 except the big GEMMs of the coarse phase (float32, see `passes/cp.py`).",
    "  Errors are `||W - W_hat|| / ||W||` in float64 of each returned model.",
    "- *speedup* = tensorly time / convfx time, each run with its own defaults (so for *capped* rows",
    "  tensorly ran fewer iterations than convfx's sweeps). *per-iteration speedup* = (tensorly s / its",
    "  iterations) / (convfx s / its sweeps), set-up included on both sides.",
    "- *to match tensorly's error*: the fewest sweeps k at which `cp_als(W, rank, n_iter_max=k, damping=0)` reaches an",
    "  error <= tensorly's final error (found by doubling from 8, then bisection; exact, because `cp_als` is",
    "  deterministic and its returned error never increases with `n_iter_max`), the time of that call and",
    "  tensorly's time divided by it: the speedup at equal or lower error (time to equal error).",
    "- Calls under 2 s are repeated up to 3 times and the best time is kept (both libraries).",
]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x"


def _row_line(r: CPRow) -> str:
    return (
        f"{r.kind:>12} {str(r.shape):>18} R={r.rank:<4} tensorly {_fmt(r.tl_s, '8.2f')}s ({r.tl_iters} it)"
        f" err {_fmt(r.tl_err, '.5f')} | convfx {r.ours_s:7.3f}s ({r.ours_sweeps} sw) err {r.ours_err:.5f}"
        f" | x{_fmt(r.speedup, '.1f')} per-it x{_fmt(r.per_iter_speedup, '.1f')}"
        f" | matched: {r.match_sweeps} sw x{_fmt(r.match_speedup, '.1f')}"
    )


def cp_table(rows: Sequence[CPRow]) -> str:
    """Markdown table of CP rows."""
    head = (
        "| weight | shape | rank | tensorly s (iters) | tensorly rel err | convfx s (sweeps) | convfx rel err "
        "| convfx err <= tensorly | speedup | per-iteration speedup | to match tensorly's error: sweeps, s, speedup |\n"
        "|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        ok = "-" if r.tl_err is None else ("yes" if r.ours_err <= r.tl_err else "NO")
        match = "-" if r.match_sweeps is None else f"{r.match_sweeps}, {r.match_s:.3f}, {r.match_speedup:.1f}x"
        shape = "x".join(map(str, r.shape))
        iters = "-" if r.tl_iters is None else (f"{r.tl_iters}" + (", capped" if r.tl_iter_max < 100 else ""))
        lines.append(
            f"| {r.kind} | {shape} | {r.rank} | {_fmt(r.tl_s, '.2f')} ({iters}) | {_fmt(r.tl_err, '.5f')} "
            f"| {r.ours_s:.3f} ({r.ours_sweeps}) | {r.ours_err:.5f} | {ok} | {_times(r.speedup)} "
            f"| {_times(r.per_iter_speedup)} | {match} |"
        )
    return head + "\n".join(lines) + "\n"


def machine_lines(threads: int) -> list[str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import tensorly

        tl_version = tensorly.__version__
    except ImportError:
        tl_version = "not installed"
    return [
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs (shared with other jobs), torch.set_num_threads({threads})",
        f"- torch {torch.__version__}, tensorly {tl_version}, Python {platform.python_version()}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cp"], default="cp", help="which benchmark to run")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, ranks {QUICK_RANKS}")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="channel counts (C_in = C_out)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--omp-default", action="store_true",
                        help="keep the OpenMP runtime's default wait policy (idle CPU; default: PASSIVE)")
    parser.add_argument("--no-tensorly", action="store_true", help="time convfx only")
    parser.add_argument("--tl-iter-max", type=int, default=100, help="tensorly n_iter_max (its default: 100)")
    parser.add_argument(
        "--heavy-tl-iter-max",
        type=int,
        default=None,
        help="cap tensorly's n_iter_max for the heavy cases (C*C*rank >= --heavy-from)",
    )
    parser.add_argument("--heavy-from", type=int, default=512 * 512 * 256, help="C*C*rank of a heavy case")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"markdown file (default: {RESULTS} for the full default run, else none)",
    )
    parser.add_argument("--append", action="store_true", help="add a section to --output instead of replacing it")
    parser.add_argument("--title", default="Decomposition speed: CP (convfx `cp_als` vs tensorly `parafac`)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    ranks = args.ranks or (QUICK_RANKS if args.quick else RANKS)
    # warm up lazy initialisation in both libraries outside the timings
    cp_als(kaiming_weight(8, 8), 4, n_iter_max=2)
    if not args.no_tensorly:
        _tensorly_parafac(kaiming_weight(8, 8), 4, 2)

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = run_cp(
        sizes,
        ranks,
        args.kinds,
        tensorly=not args.no_tensorly,
        tl_iter_max=args.tl_iter_max,
        heavy_tl_iter_max=args.heavy_tl_iter_max,
        heavy_from=args.heavy_from,
    )
    total = time.perf_counter() - t0
    load1 = os.getloadavg()
    table = cp_table(rows)
    print()
    print(table)
    print(f"total {total:.0f} s")

    # only the full default run replaces the committed results unless --output says otherwise
    full_run = not (args.quick or args.sizes or args.ranks or args.no_tensorly or list(args.kinds) != list(KINDS))
    output = args.output if args.output is not None else (RESULTS if full_run else None)
    if output is not None:
        command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/decompose_speed.py", *sys.argv[1:]])
        text = "\n".join(
            [
                ("## " if args.append else "# ") + args.title,
                "",
                f"Command: `{command}`",
                "",
                *machine_lines(args.threads),
                f"- load average (1 min) at start / end: {load0[0]:.1f} / {load1[0]:.1f}; "
                f"whole run took {total / 60:.1f} min",
                f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: runtime default)')} "
                "(see the note in the script)",
                "",
                *([] if args.append else [*NOTES, ""]),
                table,
            ]
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        if args.append and output.exists():
            text = output.read_text().rstrip("\n") + "\n\n" + text
        output.write_text(text)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
