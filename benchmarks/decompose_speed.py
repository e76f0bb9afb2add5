"""Speed and accuracy of convfx's decompositions against reference implementations.

Part ``cp``: :func:`passes.cp.cp_als` against ``tensorly.decomposition.parafac``
(pytorch backend) at identical ranks on 3x3 conv kernels: ResNet-50's shapes with a
kaiming-initialised weight, a structured "trained-like" weight and an exactly rank-64
weight plus 5% noise, and the pretrained ResNet-20 bundled with convfx at the ranks
``compress(method="cp", flops_target=0.4)`` gives its 3x3 convs.  Every row has tensorly,
``cp_als(damping=0)`` (plain least squares, like parafac), the previous default
(``max_degeneracy=0``: damped, polished only below 2% error) and the default that
``compress`` runs, each with its error, time and degeneracy (why: the default trades a
little error for factors that fine-tune, and the table shows what it costs).

    # what made results/decompose_speed.md (about 15-20 min on 2 shared cores):
    python benchmarks/decompose_speed.py --heavy-tl-iter-max 25 --heavy-from 16777216
    # optional: the heaviest case with tensorly uncapped (about 7 min), as an extra section
    python benchmarks/decompose_speed.py --sizes 512 --ranks 256 --kinds kaiming --append \
        --output benchmarks/results/decompose_speed.md --title "Heaviest case again, tensorly uncapped ..."
    python benchmarks/decompose_speed.py --quick    # small subset, prints only, 1-2 min
    # trainability proxy of each setting (about 4 min each), appended to the results
    python benchmarks/decompose_speed.py --part trainability --append --output benchmarks/results/decompose_speed.md

Part ``trainability``: whether SGD can start from each setting's factors.  The bundled
ResNet-20 is compressed data-free (``method="cp", flops_target=0.4``) with ``cp_als``
run in that setting, then distilled to the original for a few hundred SGD steps (lr
0.002, momentum 0.9, batch 64, BN in train mode as in fine-tuning) on the 500 bundled
calibration images with random flips: degenerate factors make the loss jump and the
accuracy collapse within the first steps.

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

from passes.cp import CPResult, cp_als  # noqa: E402

__all__ = [
    "CONFIGS",
    "CPRow",
    "Fit",
    "kaiming_weight",
    "trained_like_weight",
    "noisy_low_rank_weight",
    "resnet20_cases",
    "rel_error",
    "degeneracy",
    "time_call",
    "bench_cp_case",
    "fewest_sweeps",
    "run_cp",
    "cp_table",
    "summary_lines",
    "TRAIN_CONFIGS",
    "TrainRow",
    "trainability",
    "trainability_table",
    "machine_lines",
    "main",
]

RESULTS = Path(__file__).resolve().parent / "results" / "decompose_speed.md"
SIZES = (64, 128, 256, 512)
RANKS = (64, 128, 256)
KINDS = ("kaiming", "trained-like", "noisy-rank64", "resnet20")
# noisy-rank64 is fitted at its true rank only; resnet20 at the ranks compress chooses.
NOISY_RANK = 64
NOISE = 0.05
# convfx settings side by side in every row: keyword arguments of cp_als
CONFIGS: dict[str, dict[str, float]] = {
    "damping=0": {"damping": 0.0},
    "previous default": {"max_degeneracy": 0.0},
    "default": {},
}
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


def noisy_low_rank_weight(c_out: int, c_in: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    """An exactly rank-64 kernel (i.i.d. Gaussian factors) plus i.i.d. noise of 5% of its norm.

    Its least-squares rank-64 fit is well posed (not degenerate), so a solver that stops
    short of it, e.g. by damping, shows up here; kaiming-scaled like the others.
    """
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, NOISY_RANK, generator=g, dtype=torch.float64) for n in (c_out, c_in, k, k)]
    w = torch.einsum("ar,br,cr,dr->abcd", *factors)
    noise = torch.randn(w.shape, generator=g, dtype=torch.float64)
    w = w + NOISE * w.norm() / noise.norm() * noise
    return (w / w.std() * math.sqrt(2.0 / (c_in * k * k))).float()


WEIGHTS: dict[str, Callable[[int, int, int, int], torch.Tensor]] = {
    "kaiming": kaiming_weight,
    "trained-like": trained_like_weight,
    "noisy-rank64": noisy_low_rank_weight,
}


def resnet20_cases() -> list[tuple[str, torch.Tensor, int]]:
    """``(layer, weight, rank)`` for every 3x3 conv of the bundled pretrained CIFAR-10 ResNet-20.

    The ranks are those ``compress(method="cp", flops_target=0.4)`` allocates (read from
    its report), so the fits are the ones compress would run on these kernels.
    """
    import convfx
    from convfx import zoo

    model = zoo.demo_model()
    report = convfx.compress(zoo.demo_model(), torch.zeros(1, 3, 32, 32), method="cp", flops_target=0.4,
                             progress=False).convfx_report
    modules = dict(model.named_modules())
    cases = []
    for layer in report.factorized:
        weight = modules[layer.fqn].weight.detach()  # type: ignore[union-attr]
        if layer.method == "cp" and layer.ranks and tuple(weight.shape[2:]) == (3, 3):
            cases.append((layer.fqn, weight.clone(), int(layer.ranks[0])))
    return cases


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


def degeneracy(weights: torch.Tensor, factors: Sequence[torch.Tensor]) -> tuple[float, float]:
    """``(||w||_2, sum w)`` over ``||W_hat||`` of a Kruskal model, columns normalised first.

    The first is :attr:`passes.cp.CPResult.degeneracy` (1 for orthogonal components, large
    when they cancel); the second is the ratio earlier notes quote (up to 760x), ~sqrt(R)
    times the first for comparable weights.  Applied the same way to every solver.
    """
    w = weights.double().clone()
    units = []
    for f in factors:
        norms = torch.linalg.vector_norm(f.double(), dim=0)
        w = w * norms
        units.append(f.double() / norms.clamp_min(1e-300))
    gram = torch.ones(w.shape[0], w.shape[0], dtype=torch.float64)
    for u in units:
        gram = gram * (u.T @ u)
    model = math.sqrt(max(float(w @ gram @ w), 1e-300))
    return float(w.norm()) / model, float(w.abs().sum()) / model


@dataclass
class Fit:
    """One solver's result on one case."""

    seconds: float
    rel_error: float
    iters: int
    degeneracy: float  # ||w||_2 / ||W_hat|| (cp_als's guard measure)
    cancellation: float  # sum |w| / ||W_hat||


@dataclass
class CPRow:
    kind: str
    layer: str  # the ResNet-20 layer name, or the shape
    shape: tuple[int, ...]
    rank: int
    tl: Fit | None
    tl_iter_max: int
    fits: dict[str, Fit]  # by CONFIGS key
    match_sweeps: int | None = None  # fewest damping=0 sweeps to reach tensorly's error
    match_s: float | None = None
    match_err: float | None = None

    @property
    def default(self) -> Fit:
        return self.fits["default"]

    @property
    def speedup(self) -> float | None:
        """tensorly time / default convfx time, each with its own defaults (and tensorly's cap)."""
        return None if self.tl is None else self.tl.seconds / self.default.seconds

    @property
    def match_speedup(self) -> float | None:
        if self.tl is None or self.match_s is None:
            return None
        return self.tl.seconds / self.match_s


def _tensorly_parafac(w: torch.Tensor, rank: int, n_iter_max: int) -> Fit:
    """tensorly's ``parafac`` (float32, pytorch backend) with the benchmark's settings."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("pytorch")
    with warnings.catch_warnings():  # "n_eigenvecs larger than min(matrix.shape)" for 3x3 modes
        warnings.simplefilter("ignore")
        seconds, (cp, errors) = time_call(  # type: ignore[misc]
            lambda: parafac(w, rank, n_iter_max=n_iter_max, init="svd", tol=1e-8, random_state=0, return_errors=True)
        )
    deg, cancel = degeneracy(cp.weights, cp.factors)
    return Fit(seconds, rel_error(w, tl.cp_to_tensor(cp)), len(errors), deg, cancel)


def _convfx(w: torch.Tensor, rank: int, **kw: float) -> Fit:
    seconds, res = time_call(lambda: cp_als(w, rank, **kw))
    assert isinstance(res, CPResult)
    deg, cancel = degeneracy(res.weights, res.factors)
    return Fit(seconds, res.rel_error, res.n_iter, deg, cancel)


def bench_cp_case(
    kind: str, w: torch.Tensor, rank: int, *, layer: str = "", tensorly: bool = True, tl_iter_max: int = 100,
    match: bool = True,
) -> CPRow:
    """One (weight, rank) case: tensorly and every convfx setting of ``CONFIGS``, each with its defaults."""
    fits = {name: _convfx(w, rank, **kw) for name, kw in CONFIGS.items()}
    tl_fit = _tensorly_parafac(w, rank, tl_iter_max) if tensorly else None
    row = CPRow(kind, layer or "x".join(map(str, w.shape)), tuple(w.shape), rank, tl_fit, tl_iter_max, fits)
    plain = fits["damping=0"]
    if match and tl_fit is not None and plain.rel_error <= tl_fit.rel_error:
        sweeps = fewest_sweeps(w, rank, tl_fit.rel_error, plain.iters)
        row.match_s, r = time_call(lambda: cp_als(w, rank, n_iter_max=sweeps, damping=0))
        assert isinstance(r, CPResult)
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
    """All CP cases; ``heavy_tl_iter_max`` caps tensorly where ``C_out*C_in*rank >= heavy_from``."""
    cases: list[tuple[str, str, torch.Tensor, int]] = []
    for kind in kinds:
        if kind == "resnet20":
            cases += [(kind, layer, w, rank) for layer, w, rank in resnet20_cases()]
            continue
        for c in sizes:
            for rank in ((NOISY_RANK,) if kind == "noisy-rank64" else ranks):
                cases.append((kind, "", WEIGHTS[kind](c, c, 3, 0), rank))
    rows = []
    for kind, layer, w, rank in cases:
        cap = tl_iter_max
        if heavy_tl_iter_max is not None and w.shape[0] * w.shape[1] * rank >= heavy_from:
            cap = heavy_tl_iter_max
        row = bench_cp_case(kind, w, rank, layer=layer, tensorly=tensorly, tl_iter_max=cap)
        log(_row_line(row))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- reporting

NOTES = [
    "How to read it:",
    "",
    "- Every solver gets the same float32 weight. tensorly: `parafac(W, rank, init='svd', tol=1e-8, random_state=0)`",
    "  with its other defaults (n_iter_max=100 unless marked *capped*), pytorch backend, computing in float32.",
    "  convfx `cp_als(W, rank, ...)` with its other defaults (n_iter_max=100 per phase, tol=1e-6 on the relative",
    "  change of the error, `init='auto'`), float64 except the big GEMMs of the coarse phase (see `passes/cp.py`):",
    "  - *damping=0*: plain least-squares ALS, the like-for-like setting against parafac;",
    "  - *previous default* (`max_degeneracy=0`): ALS damped by a relative ridge of 1e-2, polished undamped only",
    "    when it ends below 2% error -- what `compress` ran before;",
    "  - *default* (what `compress` runs): the same damped fit, then polished undamped for as long as the",
    "    degeneracy stays <= 1.5 (the polish stops before the first sweep that would exceed it).",
    "- Each cell: relative error `||W - W_hat|| / ||W||` (float64) . seconds (iterations or sweeps, both phases)",
    "  . degeneracy q = `||weights||_2 / ||W_hat||` / `sum(weights) / ||W_hat||` (columns normalised, the same",
    "  formula for every solver). q is 1 for orthogonal components and grows without bound as components cancel;",
    "  the second ratio is the one earlier notes quote (\"up to 760x the kernel's norm\"), about sqrt(rank) x q.",
    "- *default <= tensorly*: the default's error against tensorly's. *speedup*: tensorly time / default time.",
    "- *damping=0 to match tensorly*: the fewest sweeps k at which `cp_als(W, rank, n_iter_max=k, damping=0)`",
    "  reaches an error <= tensorly's (doubling from 8, then bisection; exact, because that call is deterministic",
    "  and its error never increases with k), that call's time and tensorly's time divided by it.",
    "- Calls under 2 s are repeated up to 3 times and the best time is kept (every solver).",
    "- Weights: *kaiming* N(0, 2/fan_in); *trained-like* low multilinear rank with decaying spectra plus 20% noise;",
    "  *noisy-rank64* exactly rank 64 (Gaussian factors) plus 5% noise, fitted at rank 64; *resnet20* the",
    "  pretrained CIFAR-10 ResNet-20 bundled with convfx (`zoo.demo_model()`), every 3x3 conv at the rank",
    "  `compress(m, torch.zeros(1, 3, 32, 32), method='cp', flops_target=0.4)` gives it.",
]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x"


def _cell(f: Fit | None, *, capped: bool = False) -> str:
    if f is None:
        return "-"
    iters = f"{f.iters}, capped" if capped else f"{f.iters}"
    return f"{f.rel_error:.5f} . {f.seconds:.3f} s ({iters}) . {f.degeneracy:.2f} / {f.cancellation:.1f}"


def _row_line(r: CPRow) -> str:
    parts = [f"{r.kind:>12} {r.layer:>16} R={r.rank:<4}", f"tensorly {_cell(r.tl)}"]
    parts += [f"{name} {_cell(f)}" for name, f in r.fits.items()]
    parts.append(f"x{_fmt(r.speedup, '.1f')} matched: {r.match_sweeps} sw x{_fmt(r.match_speedup, '.1f')}")
    return " | ".join(parts)


def cp_table(rows: Sequence[CPRow]) -> str:
    """Markdown table of CP rows."""
    head = (
        "| weight | layer / shape | rank | tensorly | convfx damping=0 | convfx previous default | **convfx default** "
        "| default <= tensorly | speedup | damping=0 to match tensorly: sweeps, s, speedup |\n"
        "|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        ok = "-" if r.tl is None else ("yes" if r.default.rel_error <= r.tl.rel_error else "NO")
        match = "-" if r.match_sweeps is None else f"{r.match_sweeps}, {r.match_s:.3f}, {r.match_speedup:.1f}x"
        cells = [_cell(r.tl, capped=r.tl_iter_max < 100)] + [_cell(r.fits[name]) for name in CONFIGS]
        tail = f" | {ok} | {_times(r.speedup)} | {match} |"
        lines.append(f"| {r.kind} | {r.layer} | {r.rank} | " + " | ".join(cells) + tail)
    return head + "\n".join(lines) + "\n"


def summary_lines(rows: Sequence[CPRow]) -> list[str]:
    """Counts that the hand-written summary would otherwise have to tally."""
    with_tl = [r for r in rows if r.tl is not None]
    out = []
    for name in CONFIGS:
        wins = sum(r.fits[name].rel_error <= r.tl.rel_error for r in with_tl)  # type: ignore[union-attr]
        q = max((r.fits[name].degeneracy for r in rows), default=math.nan)
        out.append(f"- {name}: error <= tensorly's in {wins} of {len(with_tl)} rows; largest degeneracy q {q:.2f}")
    if with_tl:
        q = max(r.tl.degeneracy for r in with_tl)  # type: ignore[union-attr]
        out.append(f"- tensorly: largest degeneracy q {q:.2f}")
    return out


# --------------------------------------------------------------------------- trainability

# settings of the SGD proxy: CONFIGS plus two looser bounds, to show where training breaks
TRAIN_CONFIGS: dict[str, dict[str, float]] = {
    **CONFIGS,
    "max_degeneracy=2": {"max_degeneracy": 2.0},
    "max_degeneracy=inf": {"max_degeneracy": math.inf},
}


@dataclass
class TrainRow:
    """One setting of the SGD proxy."""

    config: str
    max_degeneracy: float  # largest q over the compressed layers
    max_cancellation: float  # largest sum(w) / ||W_hat|| over them
    mean_error: float  # mean relative kernel error over them
    kd_before: float  # KL(teacher || student) on the calibration images, eval mode
    kd_after: float
    acc_before: float  # top-1 on the first ``eval_images`` test images
    acc_after: float
    loss_start: float  # training loss of the first step, before any update
    loss_first: float  # mean training loss over the first / last 25 steps
    loss_last: float
    finite: bool
    seconds: float


def trainability(config: str, *, steps: int = 300, batch: int = 64, lr: float = 0.002,
                 eval_images: int = 1000, seed: int = 0) -> TrainRow:
    """Compress the bundled ResNet-20 with ``TRAIN_CONFIGS[config]`` and distil it for ``steps`` SGD steps."""
    import torch.nn.functional as F

    import convfx
    import passes.cp as cp_module
    from convfx import zoo
    from convfx.data import demo_data

    fits: list[CPResult] = []
    plain = cp_module.cp_als

    def patched(tensor: torch.Tensor, rank: int, **kw: object) -> CPResult:
        res = plain(tensor, rank, **{**kw, **TRAIN_CONFIGS[config]})  # type: ignore[arg-type]
        fits.append(res)
        return res

    teacher = zoo.demo_model().eval()
    cp_module.cp_als = patched  # compress looks cp_als up in passes.cp at call time
    try:
        student = convfx.compress(zoo.demo_model(), torch.zeros(1, 3, 32, 32), method="cp", flops_target=0.4,
                                  progress=False)
    finally:
        cp_module.cp_als = plain
    if not fits:
        raise RuntimeError("compress did not call passes.cp.cp_als; the proxy cannot set its options")
    test, calib = demo_data(zoo.normalization_of(teacher))
    xs = torch.stack([calib[i][0] for i in range(len(calib))])
    tx = torch.stack([test[i][0] for i in range(eval_images)])
    ty = torch.tensor([test[i][1] for i in range(eval_images)])
    with torch.no_grad():
        t_calib = teacher(xs)

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)

    def scores() -> tuple[float, float]:
        student.eval()
        with torch.no_grad():
            kd = float(kl(student(xs), t_calib))
            acc = float((student(tx).argmax(1) == ty).float().mean())
        return kd, acc

    kd0, acc0 = scores()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    student.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (batch,), generator=g)
        flip = torch.rand(batch, 1, 1, 1, generator=g) < 0.5
        x = torch.where(flip, xs[idx].flip(3), xs[idx])
        with torch.no_grad():
            target = teacher(x)
        loss = kl(student(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    seconds = time.perf_counter() - t0
    kd1, acc1 = scores()
    degs = [degeneracy(r.weights, r.factors) for r in fits]
    return TrainRow(
        config, max(d[0] for d in degs), max(d[1] for d in degs), sum(r.rel_error for r in fits) / len(fits),
        kd0, kd1, acc0, acc1, losses[0], sum(losses[:25]) / len(losses[:25]), sum(losses[-25:]) / len(losses[-25:]),
        all(math.isfinite(v) for v in losses), seconds,
    )


def trainability_table(rows: Sequence[TrainRow]) -> str:
    """Markdown table of the SGD proxy."""
    head = (
        "| cp_als setting | largest q / sum ratio | mean kernel error | KL to teacher before -> after "
        "| top-1 before -> after | loss at step 0; mean over steps 0-24 -> last 25 | finite |\n"
        "|---|---:|---:|---:|---:|---:|:---:|\n"
    )
    lines = [
        f"| {r.config} | {r.max_degeneracy:.2f} / {r.max_cancellation:.1f} | {r.mean_error:.4f} "
        f"| {r.kd_before:.3f} -> {r.kd_after:.3f} | {r.acc_before:.3f} -> {r.acc_after:.3f} "
        f"| {r.loss_start:.3f}; {r.loss_first:.3f} -> {r.loss_last:.3f} | {'yes' if r.finite else 'NO'} |"
        for r in rows
    ]
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
    parser.add_argument("--part", choices=["cp", "trainability"], default="cp", help="which benchmark to run")
    parser.add_argument("--configs", nargs="+", choices=list(TRAIN_CONFIGS), default=list(TRAIN_CONFIGS),
                        help="settings of the trainability part")
    parser.add_argument("--steps", type=int, default=300, help="SGD steps of the trainability part")
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
    parser.add_argument("--title",
                        default="Decomposition speed and accuracy: CP (convfx `cp_als` vs tensorly `parafac`)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.part == "trainability":
        return _main_trainability(args)
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
    summary = summary_lines(rows)
    print()
    print(table)
    print("\n".join(summary))
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
                *summary,
                "",
            ]
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        if args.append and output.exists():
            text = output.read_text().rstrip("\n") + "\n\n" + text
        output.write_text(text)
        print(f"wrote {output}")
    return 0


def _main_trainability(args: argparse.Namespace) -> int:
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    for config in args.configs:
        row = trainability(config, steps=args.steps)
        print(row, flush=True)
        rows.append(row)
    total = time.perf_counter() - t0
    table = trainability_table(rows)
    print()
    print(table)
    if args.output is not None:
        command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/decompose_speed.py", *sys.argv[1:]])
        title = "Trainability proxy: SGD distillation from each setting's factors"
        title = args.title if "--title" in sys.argv else title
        text = "\n".join([
            ("## " if args.append else "# ") + title,
            "",
            f"Command: `{command}`",
            "",
            *machine_lines(args.threads),
            f"- load average (1 min) at start / end: {load0[0]:.1f} / {os.getloadavg()[0]:.1f}; "
            f"whole run took {total / 60:.1f} min",
            f"- {args.steps} SGD steps per setting (see the script's docstring for the recipe)",
            "",
            table,
        ])
        if args.append and args.output.exists():
            text = args.output.read_text().rstrip("\n") + "\n\n" + text
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
