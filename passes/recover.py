"""Recovery stage: label-free distillation of the compressed network from the original.

Why: the layer-by-layer fits each minimise their own layer's error, so errors that only
show after several layers (and BatchNorm statistics shifted by earlier layers) are left
behind. Training the whole compressed net to reproduce the original's outputs on the
calibration images can remove some of that, and needs no labels: the teacher is the
original model. A few hundred images are few, so batches are augmented (flips and padded random
crops by default) and the teacher is re-run on each augmented batch.

Safety: the loss is checked at every step; on a non-finite loss training stops and the
best weights seen are put back. With ``held_out`` inputs (calibration images kept out of
training) the weights returned are those with the lowest KL on them, at the start or at
a checkpoint: the guard then catches over-fitting too, not only divergence.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batches import model_device
from .calibrate import output_discrepancy
from .errors import ConvfxError
from .factors import Factorized
from .flops import eval_mode

__all__ = ["DistillConfig", "DistillResult", "distill", "default_augment", "mix", "penultimate", "inputs_only",
           "TRAIN_SETS", "BN_MODES"]

log = logging.getLogger(__name__)

#: What :func:`distill` trains: every floating-point parameter, only the factor layers'
#: weights (:class:`~passes.factors.Factorized` children), or those plus BatchNorm affines.
TRAIN_SETS = ("all", "factors", "factors+bn")
#: BatchNorm handling. ``frozen``: BN layers stay in eval mode (running statistics fixed,
#: used as they are). ``recalibrate``: running statistics re-estimated on the calibration
#: inputs first, then frozen. ``augmented``: the same on augmented copies of them (the training
#: augmentation, mixup included). ``train``: batch statistics while training, running
#: statistics re-estimated on the calibration inputs at each checkpoint and at the end.
BN_MODES = ("frozen", "recalibrate", "augmented", "train")
#: ``augmented`` BN: how many augmented copies of the calibration inputs the statistics are averaged over.
_BN_AUG_PASSES = 4

Augment = Callable[[Tensor], Tensor]

_BN = nn.modules.batchnorm._BatchNorm
#: Fraction of the steps over which the learning rate ramps up linearly before the cosine
#: decay: Adam's first updates are full-size whatever the gradient scale.
_WARMUP = 0.05


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class DistillConfig:
    """Settings of :func:`distill`. Errors name the ``compress`` argument (``distill_<field>``).

    ``augment`` is ``"default"`` (:func:`default_augment`: flips and padded random crops of
    4-D image batches), ``None`` (no augmentation) or a callable ``(batch) -> batch`` that
    returns a batch the models accept (it sees un-augmented calibration batches).
    ``checkpoints`` is how many times the calibration KL is measured during training
    (the best weights seen are restored on divergence).

    The loss is ``kl_weight`` × KL(teacher ‖ student) at ``temperature`` (× T²) plus
    ``feature_weight`` × the relative MSE ‖f_s − f_t‖² / ‖f_t‖² of intermediate features
    (MiR-style feature mimicking), averaged over the ``features`` taps: ``"penultimate"`` is
    the input of the teacher's last ``nn.Linear`` (the pooled features a classifier head
    reads), a tuple names modules whose outputs are matched (e.g. BatchNorm layers, which the
    compressed GraphModule keeps under their original names). ``mixup`` is the fraction of
    each training batch replaced by blends ``λ a + (1 − λ) b`` (λ ~ U(0, 1)) of two augmented
    images of the batch: inputs between the calibration images, on which the teacher is run
    like on any other (no labels are involved).

    ``max_seconds`` bounds the wall time of the whole call: the schedule (warm-up, cosine
    decay, checkpoints) then follows whichever runs out first, the steps or the seconds, and
    training ends early enough for a last checkpoint (twice the time the first KL
    measurement took is kept for it and a possible restore) — fewer steps than asked on a
    slow or busy machine; the result's note says so. ``None``: exactly ``steps`` steps.

    Defaults were chosen on a selection split (CIFAR train images never calibrated on, never
    the test set) of the CIFAR ResNet-20/56 at 2-2.5x (``benchmarks/results/recovery_cpu.md``):
    output KL at T 1 (matching the penultimate features as well, or instead, was worse there),
    half of each batch mixup-blended (the same top-1 on ResNet-20, +0.55 on ResNet-56 CP 2.5x,
    where plain KL did not lower the held-out KL at all), Adam at ``lr`` 1e-4 (3e-4 and 1e-3
    moved the net away from its teacher on held-out images; 3e-5 recovered less), every
    parameter trained (factors + BN only: the same), batches of 64. BN stays ``frozen``:
    re-estimating statistics on the calibration images, plain or augmented, cost 0.8 to 1.6
    points of top-1 on the CP-factored nets, before or after training.
    """

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 64
    temperature: float = 1.0
    train: Literal["all", "factors", "factors+bn"] = "all"
    bn: Literal["frozen", "recalibrate", "augmented", "train"] = "frozen"
    augment: Augment | Literal["default"] | None = "default"
    seed: int = 0
    checkpoints: int = 4
    kl_weight: float = 1.0
    feature_weight: float = 0.0
    features: str | tuple[str, ...] = "penultimate"
    mixup: float = 0.5
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, want: str, got: object, as_type: bool = False) -> ValueError:
            plain = isinstance(got, (int, float, str)) and not as_type
            return ValueError(f"distill_{name}: expected {want}, got {repr(got) if plain else type(got).__name__}")

        if not _is_int(self.steps) or self.steps < 0:
            raise bad("steps", "an int >= 0", self.steps)
        if not _is_real(self.lr) or self.lr <= 0:
            raise bad("lr", "a finite float > 0", self.lr)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise bad("batch_size", "an int >= 1", self.batch_size)
        if not _is_real(self.temperature) or self.temperature <= 0:
            raise bad("temperature", "a finite float > 0", self.temperature)
        if self.train not in TRAIN_SETS:
            raise bad("train", f"one of {TRAIN_SETS}", self.train)
        if self.bn not in BN_MODES:
            raise bad("bn", f"one of {BN_MODES}", self.bn)
        if not (self.augment is None or (isinstance(self.augment, str) and self.augment == "default") or
                (callable(self.augment) and not isinstance(self.augment, str))):
            raise bad("augment", "a callable (batch) -> batch, 'default' or None", self.augment,
                      as_type=not isinstance(self.augment, str))
        if not _is_int(self.seed):
            raise bad("seed", "an int", self.seed)
        if not _is_int(self.checkpoints) or self.checkpoints < 1:
            raise bad("checkpoints", "an int >= 1", self.checkpoints)
        if not _is_real(self.kl_weight) or self.kl_weight < 0:
            raise bad("kl_weight", "a finite float >= 0", self.kl_weight)
        if not _is_real(self.feature_weight) or self.feature_weight < 0:
            raise bad("feature_weight", "a finite float >= 0", self.feature_weight)
        if self.kl_weight == 0 and self.feature_weight == 0:
            raise bad("kl_weight", "a positive kl_weight or feature_weight (the loss would be zero)", self.kl_weight)
        if isinstance(self.features, list):  # distill_settings={"features": [...]} from JSON or a CLI
            object.__setattr__(self, "features", tuple(self.features))
        if not (self.features == "penultimate" or (isinstance(self.features, tuple) and self.features and
                                                   all(isinstance(f, str) and f for f in self.features))):
            raise bad("features", "'penultimate' or a non-empty tuple of module names", self.features,
                      as_type=not isinstance(self.features, str))
        if not _is_real(self.mixup) or not 0 <= self.mixup <= 1:
            raise bad("mixup", "a fraction in [0, 1]", self.mixup)
        if self.max_seconds is not None and (not _is_real(self.max_seconds) or self.max_seconds <= 0):
            raise bad("max_seconds", "None or a finite number of seconds > 0", self.max_seconds)


@dataclass
class DistillResult:
    """What :func:`distill` did. KLs are mean KL(teacher ‖ student) at temperature 1 on
    un-augmented inputs (relative MSE for outputs that are not (N, classes) logits)."""

    steps: int  # optimizer steps taken (fewer than asked on divergence)
    seconds: float
    kl_before: float
    kl_after: float
    restored: str | None  # why earlier weights were put back, None if the trained ones were kept
    bn: str
    lr: float
    held_before: float | None = None  # the same on ``held_out`` inputs, when given
    held_after: float | None = None
    time_limit: float | None = None  # max_seconds, when it ended training before ``planned`` steps
    planned: int | None = None

    def note(self) -> str:
        """One line for the report."""
        steps = (f"{self.steps} of {self.planned} label-free steps (time limit {self.time_limit:g} s)"
                 if self.time_limit is not None and self.planned is not None else f"{self.steps} label-free steps")
        text = (f"distill: {steps} in {self.seconds:.1f} s (lr {_short(self.lr)}, {self.bn} BN), "
                f"calibration output KL {self.kl_before:.3g} -> {self.kl_after:.3g}")
        if self.held_before is not None and self.held_after is not None:
            text += f", held-out {self.held_before:.3g} -> {self.held_after:.3g}"
        if self.restored:
            text += f"; {self.restored}"
        return text


def _short(v: float) -> str:
    """A learning rate as people write it: 1e-3, 3e-4, 0.05."""
    if 1e-2 <= abs(v) < 1e4:
        return f"{v:.3g}"
    m, e = f"{v:.2e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def default_augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Per image: a horizontal flip (p = 1/2) and a random crop of the image padded by 1/8 of
    each side (reflect padding, so no artificial borders), back to the same H×W.

    Non-4-D or non-float tensors are returned unchanged. ``gen`` is a CPU generator; the
    draws are moved to ``x``'s device.
    """
    if x.dim() != 4 or not x.is_floating_point():
        return x
    n, _, h, w = x.shape
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    ph, pw = h // 8, w // 8
    if ph == 0 and pw == 0:
        return x
    xp = F.pad(x, (pw, pw, ph, ph), mode="reflect")
    dy = torch.randint(0, 2 * ph + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pw + 1, (n,), generator=gen).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (n, w)
    out = xp[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # n, h, w, C
    return out.permute(0, 3, 1, 2).contiguous()


def inputs_only(batches: Iterable[Tensor | Sequence[object]]) -> list[Tensor]:
    """The input tensors of ``batches`` (bare tensors, or ``(x, y, ...)`` whose ``x`` is kept).

    Why: distillation is label-free; callers hand over loaders that may carry labels,
    which are dropped here unread.
    """
    out = []
    for i, b in enumerate(batches):
        x = b if isinstance(b, Tensor) else b[0] if isinstance(b, (tuple, list)) and len(b) > 0 else None
        if not isinstance(x, Tensor):
            raise ValueError(f"inputs: batch {i}: expected a tensor or an (x, ...) tuple with a tensor x, "
                             f"got {type(b).__name__}")
        out.append(x)
    return out


def _check_batches(batches: object, name: str) -> list[Tensor]:
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(f"{name}: expected a non-empty list of input tensors, got {type(batches).__name__}")
    for i, b in enumerate(batches):
        if not isinstance(b, Tensor):
            raise ValueError(f"{name}: batch {i}: expected a tensor (strip labels with inputs_only), "
                             f"got {type(b).__name__}")
        if b.dim() == 0 or b.shape[0] == 0:
            raise ValueError(f"{name}: batch {i}: expected a non-empty batch, got shape {tuple(b.shape)}")
    return list(batches)


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    y = model(x)
    if not isinstance(y, Tensor):
        raise ConvfxError(f"distillation needs a model that returns one tensor, got {type(y).__name__}",
                          where=type(model).__name__, hint="wrap the model so that it returns its logits")
    return y


def _loss(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """KL(softened teacher ‖ softened student) × T² for (N, classes) logits, else relative MSE."""
    if t.dim() == 2 and t.shape[1] > 1:
        ls, lt = F.log_softmax(s.float() / temperature, 1), F.log_softmax(t.float() / temperature, 1)
        return F.kl_div(ls, lt, log_target=True, reduction="batchmean") * temperature ** 2
    return (s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-30)


def _outputs(model: nn.Module, batches: list[Tensor], device: torch.device) -> Tensor:
    with torch.no_grad():
        return torch.cat([_forward(model, x.to(device)).detach() for x in batches])


def _trainable(student: nn.Module, which: str) -> list[nn.Parameter]:
    if which == "all":
        params = [p for p in student.parameters() if p.is_floating_point()]
    else:
        mods: list[nn.Module] = [m for m in student.modules() if isinstance(m, Factorized)]
        if which == "factors+bn":
            mods += [m for m in student.modules() if isinstance(m, _BN)]
        seen: dict[int, nn.Parameter] = {}
        for m in mods:
            for p in m.parameters():
                if p.is_floating_point():
                    seen.setdefault(id(p), p)
        params = list(seen.values())
    if not params:
        raise ConvfxError(f"distill_train={which!r}: the compressed model has no such parameters to train",
                          where=type(student).__name__, hint="use distill_train='all'")
    return params


def _reestimate_bn(model: nn.Module, batches: Iterable[Tensor], device: torch.device) -> None:
    """Running statistics of every BN layer as the exact average over ``batches`` (others in eval)."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return
    flags = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, f in flags.items():
            m.training = f


def mix(x: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    """``x`` with ``round(fraction · N)`` of its rows replaced by blends ``λ x_i + (1 − λ) x_j`` of two
    different rows (λ ~ U(0, 1) per blend; the draws come from the CPU generator ``gen``).

    Why: a few hundred calibration images pin the teacher's function down only at those
    images; the teacher's outputs on blends between them are further label-free targets
    ("function matching" with mixup, Beyer et al. 2022). Non-float tensors and batches of
    one row are returned unchanged.
    """
    n = int(x.shape[0]) if x.dim() > 0 else 0
    k = int(round(fraction * n))
    if k == 0 or n < 2 or not x.is_floating_point():
        return x
    rows = torch.randperm(n, generator=gen)[:k]
    other = torch.randint(0, n - 1, (k,), generator=gen)
    other = other + (other >= rows).long()  # a different row
    lam = torch.rand(k, generator=gen).to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    rows, other = rows.to(x.device), other.to(x.device)
    out = x.clone()
    out[rows] = lam * x[rows] + (1 - lam) * x[other]
    return out


def penultimate(model: nn.Module) -> str:
    """The name of ``model``'s last ``nn.Linear`` (in module order): its input is the penultimate feature."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if not names:
        raise ConvfxError("distill_features='penultimate': the model has no nn.Linear whose input to match",
                          where=type(model).__name__, hint="name the modules to match: distill_features=('a.b', ...)")
    return names[-1]


class _Taps:
    """Forward hooks that keep, per name, the input (``inputs=True``) or output of ``model``'s module
    of that name during the forwards run while :attr:`on` is set."""

    def __init__(self, model: nn.Module, names: Sequence[str], inputs: bool, role: str) -> None:
        self.names, self.on, self.role = list(names), False, role
        self.values: dict[str, Tensor] = {}
        self.handles = []
        try:
            for name in self.names:
                try:
                    mod = model.get_submodule(name)
                except AttributeError:
                    raise ConvfxError(f"distill_features: the {role} has no module {name!r}", where="distill",
                                      hint="name modules both models have (the compressed model keeps the "
                                           "original names of the layers it did not factorize)") from None
                if inputs:
                    self.handles.append(mod.register_forward_pre_hook(
                        lambda _m, args, name=name: self._put(name, args[0] if args else None)))
                else:
                    self.handles.append(mod.register_forward_hook(
                        lambda _m, _args, out, name=name: self._put(name, out)))
        except BaseException:
            self.close()
            raise

    def _put(self, name: str, value: object) -> None:
        if self.on:
            if not isinstance(value, Tensor):
                raise ConvfxError(f"distill_features: {name!r} of the {self.role} carries a "
                                  f"{type(value).__name__}, not a tensor", where="distill")
            self.values[name] = value

    def take(self) -> list[Tensor]:
        missing = [n for n in self.names if n not in self.values]
        if missing:
            raise ConvfxError(f"distill_features: the {self.role}'s forward never called {missing}",
                              where="distill", hint="name modules that run as modules in both models' forward")
        out = [self.values[n] for n in self.names]
        self.values = {}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _feature_loss(s: list[Tensor], t: list[Tensor], names: list[str]) -> Tensor:
    """Mean over the taps of the relative MSE ‖s − t‖² / ‖t‖²."""
    terms = []
    for a, b, name in zip(s, t, names):
        if a.shape != b.shape:
            raise ConvfxError(f"distill_features: {name!r} has shape {tuple(a.shape)} in the compressed model "
                              f"and {tuple(b.shape)} in the original", where="distill",
                              hint="match features whose shapes the compression keeps")
        b = b.float().to(a.device)
        terms.append((a.float() - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-30))
    return torch.stack(terms).mean()


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _schedule(steps: int) -> Callable[[int], float]:
    warm = max(1, round(_WARMUP * steps))

    def factor(i: int) -> float:  # i: steps taken so far
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))
    return factor


class _Distiller:
    """One :func:`distill` call's state: the targets, the best weights seen, the batch stream.

    Why a class: the training loop, its checkpoints and the final choice of weights share
    a dozen values; methods over one object keep each step short.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, inputs: list[Tensor], config: DistillConfig,
                 held: list[Tensor] | None) -> None:
        self.student, self.teacher, self.inputs, self.config, self.held = student, teacher, inputs, config, held
        self.start = time.perf_counter()
        self.device, self.teacher_device = model_device(student), model_device(teacher)
        self.target = _outputs(teacher, inputs, self.teacher_device).to(self.device)
        self.held_target = (_outputs(teacher, held, self.teacher_device).to(self.device)
                            if held is not None else None)
        # With held-out inputs the weights are chosen by their KL (over-fitting shows there first).
        self.judge_name = "held-out" if held is not None else "calibration"
        self.gen = torch.Generator().manual_seed(config.seed)
        self.aug: Augment | None
        if isinstance(config.augment, str):  # "default", checked by DistillConfig
            self.aug = lambda x: default_augment(x, self.gen)
        else:
            self.aug = config.augment
        self.restored: str | None = None
        self.taken = 0

    def kl(self, batches: list[Tensor], ref: Tensor) -> float:
        return output_discrepancy(_outputs(self.student, batches, self.device), ref)

    def held_kl(self) -> float | None:
        if self.held is None or self.held_target is None:
            return None
        return self.kl(self.held, self.held_target)

    def judged(self, k_train: float) -> float:
        k = self.held_kl()
        return k if k is not None else k_train

    def keep_if_best(self, score: float, at: str) -> None:
        if score < self.best_kl:
            self.best_kl, self.best_at, self.best = score, at, _snapshot(self.student)

    def batch(self, x: Tensor) -> Tensor:
        """A training batch: augmented, then partly blended."""
        if self.aug is not None:
            x = self.aug(x)
            if not isinstance(x, Tensor):
                raise ConvfxError(f"the augmentation returned {type(x).__name__}, not a tensor",
                                  where="distill_augment")
        return mix(x, self.config.mixup, self.gen) if self.config.mixup > 0 else x

    def begin(self, kl_before: float, held_before: float | None) -> None:
        """Starting weights and score (the KLs just measured); BN statistics re-estimated first when asked."""
        config = self.config
        self.kl_before = self.kl_after = kl_before
        self.initial = _snapshot(self.student)
        self.start_score = held_before if held_before is not None else kl_before
        self.best_kl, self.best_at, self.best = self.start_score, "the start", self.initial
        if config.bn in ("recalibrate", "augmented"):
            _reestimate_bn(self.student, self.inputs if config.bn == "recalibrate" else
                           (self.batch(x.to(self.device)) for _ in range(_BN_AUG_PASSES) for x in self.inputs),
                           self.device)
            self.keep_if_best(self.judged(self.kl(self.inputs, self.target)), "BN re-estimation")

    def train(self, limit: float | None, progress: bool) -> bool:
        """Adam steps with checkpoints; sets :attr:`restored` on divergence. True if the time limit ended it."""
        config, student, teacher = self.config, self.student, self.teacher
        params = _trainable(student, config.train)
        pool = torch.cat(self.inputs)
        n, bs = pool.shape[0], min(config.batch_size, pool.shape[0])
        use_features = config.feature_weight > 0
        tap_names = ([penultimate(teacher)] if config.features == "penultimate" else list(config.features)
                     ) if use_features else []
        tap_inputs = config.features == "penultimate"
        rerun_teacher = self.aug is not None or config.mixup > 0 or use_features
        ckpts = {max(1, round(config.steps * k / config.checkpoints)) for k in range(1, config.checkpoints + 1)}
        lr_factor = _schedule(config.steps)
        timed_out, checks_done = False, 0
        bns = [m for m in student.modules() if isinstance(m, _BN)]
        order, pos = torch.randperm(n, generator=self.gen), 0
        bar = tqdm(total=config.steps, desc="distill", unit="step", disable=not progress or None, leave=False)
        t_taps = _Taps(teacher, tap_names, tap_inputs, "original model")
        s_taps: _Taps | None = None
        flags = {p: p.requires_grad for p in student.parameters()}
        try:
            s_taps = _Taps(student, tap_names, tap_inputs, "compressed model")
            for p in student.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=config.lr)
            for step in range(1, config.steps + 1):
                # progress in steps, or in seconds when the time limit comes first
                done = step - 1 if limit is None else max(step - 1,
                                                          config.steps * (time.perf_counter() - self.start) / limit)
                for g in opt.param_groups:
                    g["lr"] = config.lr * lr_factor(done)
                if pos + bs > n:
                    order, pos = torch.randperm(n, generator=self.gen), 0
                idx = order[pos:pos + bs]
                x = self.batch(pool[idx.to(pool.device)].to(self.device))
                pos += bs
                t_feats: list[Tensor] = []
                if rerun_teacher:
                    with torch.no_grad():
                        t_taps.on = True
                        t = _forward(teacher, x.to(self.teacher_device)).to(self.device)
                        t_taps.on = False
                        t_feats = t_taps.take() if use_features else []
                else:  # the un-augmented rows: their teacher outputs are already known
                    t = self.target[idx.to(self.target.device)]
                if config.bn == "train":
                    for m in bns:
                        m.train()
                with torch.enable_grad():
                    s_taps.on = True
                    out = _forward(student, x)
                    s_taps.on = False
                    loss = config.kl_weight * _loss(out, t, config.temperature) if config.kl_weight > 0 else 0.0
                    if use_features:
                        loss = loss + config.feature_weight * _feature_loss(s_taps.take(), t_feats, tap_names)
                    assert isinstance(loss, Tensor)
                    if not bool(torch.isfinite(loss)):
                        self.restored = f"loss not finite at step {step}"
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                self.taken = step
                bar.update(1)
                if step % 10 == 0 or step == config.steps:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if limit is None:
                    due = step in ckpts
                else:  # checkpoints at fractions of the progress, in steps or seconds
                    used = (time.perf_counter() - self.start) / limit
                    timed_out = used >= 1 and step < config.steps
                    due = (step == config.steps or timed_out
                           or max(step / config.steps, used) >= (checks_done + 1) / config.checkpoints)
                if due:
                    checks_done += 1
                    if not self.checkpoint(step):
                        break
                if timed_out:
                    break
        except BaseException:
            student.load_state_dict(self.initial)  # an interrupted run leaves no half-trained student behind
            raise
        finally:
            bar.close()
            t_taps.close()
            if s_taps is not None:
                s_taps.close()
            for p, f in flags.items():
                p.requires_grad_(f)
                p.grad = None
        return timed_out

    def checkpoint(self, step: int) -> bool:
        """Measure and keep the weights if best; False when the calibration KL is not finite."""
        if self.config.bn == "train":
            _reestimate_bn(self.student, self.inputs, self.device)
        self.student.eval()
        self.kl_after = self.kl(self.inputs, self.target)
        score = self.judged(self.kl_after)
        log.debug("distill: step %d, calibration KL %.4g, %s KL %.4g", step, self.kl_after, self.judge_name, score)
        if not math.isfinite(self.kl_after):
            self.restored = f"calibration KL not finite at step {step}"
            return False
        self.keep_if_best(score, f"step {step}")
        return True

    def choose(self) -> None:
        """Put back the weights the guard prefers, and say why in :attr:`restored`."""
        student = self.student
        if self.restored is not None:  # diverged: the best weights seen
            student.load_state_dict(self.best)
            self.restored += (f": weights of {self.best_at} restored (best {self.judge_name} KL seen, "
                              f"{self.best_kl:.3g})")
        elif self.held is not None and self.best_at != f"step {self.taken}":
            student.load_state_dict(self.best)  # the held-out KL was lowest at an earlier checkpoint
            if self.best_at != "the start":
                self.restored = f"weights of {self.best_at} kept (lowest held-out KL, {self.best_kl:.3g})"
            else:
                self.restored = f"held-out KL did not fall ({self.start_score:.3g}): starting weights restored"
        elif self.held is None and self.kl_after > self.kl_before:
            student.load_state_dict(self.initial)
            self.restored = (f"calibration KL rose ({self.kl_before:.3g} -> {self.kl_after:.3g}): "
                             "starting weights restored")
        if self.restored is not None:
            self.kl_after = self.kl(self.inputs, self.target)


def distill(student: nn.Module, teacher: nn.Module, inputs: list[Tensor], config: DistillConfig, *,
            progress: bool = False, held_out: list[Tensor] | None = None) -> DistillResult:
    """Train ``student`` in place to reproduce ``teacher``'s outputs on (augmented) ``inputs``.

    Label-free: ``inputs`` are bare input batches (see :func:`inputs_only`). The teacher is
    run in eval mode under ``no_grad`` and its modes are restored; it is never modified.
    The student's modes and ``requires_grad`` flags are restored on return. ``held_out``
    batches, if given, are only measured (before and after), never trained on.

    Adam over ``config.train``'s parameters, linear warm-up then cosine decay, batches of
    ``config.batch_size`` images drawn without replacement (reshuffled each pass) from all
    of ``inputs``. Each step's loss is checked: a non-finite one stops training and the
    best weights seen are put back. With ``held_out`` inputs, "best" is the lowest KL on
    them, measured at the start and at each checkpoint, and those weights are what is
    returned (early stopping on images the student never trains on); without, the starting
    weights come back if the calibration KL rose.
    """
    if not isinstance(config, DistillConfig):
        raise ValueError(f"config: expected a DistillConfig, got {type(config).__name__}")
    inputs = _check_batches(inputs, "inputs")
    held = _check_batches(held_out, "held_out") if held_out is not None else None
    shapes = {tuple(x.shape[1:]) for x in inputs}
    if len(shapes) != 1 and config.steps > 0:
        raise ConvfxError(f"calibration batches of different shapes {sorted(shapes)} cannot be pooled",
                          where="distill", hint="resize the calibration inputs to one shape")
    with eval_mode(teacher), eval_mode(student):
        run = _Distiller(student, teacher, inputs, config, held)
        t_eval = time.perf_counter()
        kl_before, held_before = run.kl(inputs, run.target), run.held_kl()
        t_eval = time.perf_counter() - t_eval  # what one checkpoint costs
        if config.steps == 0:
            return DistillResult(0, time.perf_counter() - run.start, kl_before, kl_before, None, config.bn,
                                 config.lr, held_before, held_before)
        if not math.isfinite(kl_before):
            raise ConvfxError(f"the compressed model's calibration output discrepancy is {kl_before} before "
                              "distillation", where="distill", hint="check the compressed weights for NaN/inf")
        run.begin(kl_before, held_before)
        # training stops early enough for the last checkpoint and a possible restore to fit in max_seconds
        limit = None if config.max_seconds is None else max(config.max_seconds - 2 * t_eval, config.max_seconds / 2)
        timed_out = run.train(limit, progress)
        run.choose()
        held_after = run.held_kl()
    result = DistillResult(run.taken, time.perf_counter() - run.start, kl_before, run.kl_after, run.restored,
                           config.bn, config.lr, held_before, held_after, config.max_seconds if timed_out else None,
                           config.steps if timed_out else None)
    (log.warning if run.restored else log.info)("%s", result.note())
    return result
