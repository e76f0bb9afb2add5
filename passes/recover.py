"""Recovery stage: label-free distillation of the compressed network from the original.

Why: the layer-by-layer fits each minimise their own layer's error, so errors that only
show after several layers (and BatchNorm statistics shifted by earlier layers) are left
behind. Training the whole compressed net to reproduce the original's outputs on the
calibration images can remove some of that, and needs no labels: the teacher is the
original model. A few hundred images are few, so batches are augmented (flips and padded random
crops by default) and the teacher is re-run on each augmented batch.

Safety: the loss is checked at every step; on a non-finite loss training stops and the
best weights seen (by calibration KL, measured at the start and at a few checkpoints) are
put back. The student is never returned worse than it started on the calibration KL.
These guards judge by the images the student trains on: they catch divergence, not
over-fitting; ``held_out`` inputs measure that.
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

__all__ = ["DistillConfig", "DistillResult", "distill", "default_augment", "inputs_only", "TRAIN_SETS", "BN_MODES"]

log = logging.getLogger(__name__)

#: What :func:`distill` trains: every floating-point parameter, only the factor layers'
#: weights (:class:`~passes.factors.Factorized` children), or those plus BatchNorm affines.
TRAIN_SETS = ("all", "factors", "factors+bn")
#: BatchNorm handling. ``frozen``: BN layers stay in eval mode (running statistics fixed,
#: used as they are). ``recalibrate``: running statistics re-estimated on the calibration
#: inputs first, then frozen. ``train``: batch statistics while training, running
#: statistics re-estimated on the calibration inputs at each checkpoint and at the end.
BN_MODES = ("frozen", "recalibrate", "train")

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

    Defaults are provisional (a CPU-sized sweep on the demo ResNet-20). ``lr`` is low
    because Adam moves every weight by about ``lr`` per step whatever its scale: a
    pretrained net drifts away from its teacher on held-out images long before its
    calibration loss stops falling. BN stays ``frozen`` because re-estimating statistics
    on a few hundred un-augmented images can be worse than the stored ones even for the
    original model.
    """

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 32
    temperature: float = 1.0
    train: Literal["all", "factors", "factors+bn"] = "all"
    bn: Literal["frozen", "recalibrate", "train"] = "frozen"
    augment: Augment | Literal["default"] | None = "default"
    seed: int = 0
    checkpoints: int = 4

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

    def note(self) -> str:
        """One line for the report."""
        text = (f"distill: {self.steps} label-free steps in {self.seconds:.1f} s (lr {_short(self.lr)}, {self.bn} BN), "
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


def _reestimate_bn(model: nn.Module, batches: list[Tensor], device: torch.device) -> None:
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


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _schedule(steps: int) -> Callable[[int], float]:
    warm = max(1, round(_WARMUP * steps))

    def factor(i: int) -> float:  # i: steps taken so far
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))
    return factor


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
    weights with the lowest calibration KL seen are put back; if the end result is worse
    than the start on the calibration KL, the starting weights are put back.
    """
    if not isinstance(config, DistillConfig):
        raise ValueError(f"config: expected a DistillConfig, got {type(config).__name__}")
    inputs = _check_batches(inputs, "inputs")
    held = _check_batches(held_out, "held_out") if held_out is not None else None
    shapes = {tuple(x.shape[1:]) for x in inputs}
    if len(shapes) != 1 and config.steps > 0:
        raise ConvfxError(f"calibration batches of different shapes {sorted(shapes)} cannot be pooled",
                          where="distill", hint="resize the calibration inputs to one shape")
    start = time.perf_counter()
    device, teacher_device = model_device(student), model_device(teacher)
    flags = {p: p.requires_grad for p in student.parameters()}

    with eval_mode(teacher), eval_mode(student):
        target = _outputs(teacher, inputs, teacher_device).to(device)
        held_target = _outputs(teacher, held, teacher_device).to(device) if held is not None else None

        def kl(batches: list[Tensor], ref: Tensor) -> float:
            return output_discrepancy(_outputs(student, batches, device), ref)

        def held_kl() -> float | None:
            return kl(held, held_target) if held is not None and held_target is not None else None

        kl_before, held_before = kl(inputs, target), held_kl()
        if config.steps == 0:
            return DistillResult(0, time.perf_counter() - start, kl_before, kl_before, None, config.bn, config.lr,
                                 held_before, held_before)
        if not math.isfinite(kl_before):
            raise ConvfxError(f"the compressed model's calibration output discrepancy is {kl_before} before "
                              "distillation", where="distill", hint="check the compressed weights for NaN/inf")
        initial = _snapshot(student)
        best_kl, best_at, best = kl_before, "the start", initial
        if config.bn == "recalibrate":
            _reestimate_bn(student, inputs, device)
            k = kl(inputs, target)
            if k < best_kl:
                best_kl, best_at, best = k, "BN re-estimation", _snapshot(student)

        params = _trainable(student, config.train)
        pool = torch.cat(inputs)
        n, bs = pool.shape[0], min(config.batch_size, pool.shape[0])
        gen = torch.Generator().manual_seed(config.seed)
        aug: Augment | None
        if isinstance(config.augment, str):  # "default", checked by DistillConfig
            def aug(x: Tensor) -> Tensor:
                return default_augment(x, gen)
        else:
            aug = config.augment  # type: ignore[assignment]
        ckpts = {max(1, round(config.steps * k / config.checkpoints)) for k in range(1, config.checkpoints + 1)}
        restored: str | None = None
        kl_after, taken = kl_before, 0
        bns = [m for m in student.modules() if isinstance(m, _BN)]
        order, pos = torch.randperm(n, generator=gen), 0
        bar = tqdm(total=config.steps, desc="distill", unit="step", disable=not progress or None, leave=False)
        try:
            for p in student.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=config.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config.steps))
            for step in range(1, config.steps + 1):
                if pos + bs > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos:pos + bs]
                x = pool[idx.to(pool.device)].to(device)
                pos += bs
                if aug is not None:
                    x = aug(x)
                    if not isinstance(x, Tensor):
                        raise ConvfxError(f"the augmentation returned {type(x).__name__}, not a tensor",
                                          where="distill_augment")
                    with torch.no_grad():
                        t = _forward(teacher, x.to(teacher_device)).to(device)
                else:  # the un-augmented rows: their teacher outputs are already known
                    t = target[idx.to(target.device)]
                if config.bn == "train":
                    for m in bns:
                        m.train()
                with torch.enable_grad():
                    loss = _loss(_forward(student, x), t, config.temperature)
                    if not bool(torch.isfinite(loss)):
                        restored = f"loss not finite at step {step}"
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()
                taken = step
                bar.update(1)
                if step % 10 == 0 or step == config.steps:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if step in ckpts:
                    if config.bn == "train":
                        _reestimate_bn(student, inputs, device)
                    student.eval()
                    kl_after = kl(inputs, target)
                    log.debug("distill: step %d, calibration KL %.4g", step, kl_after)
                    if not math.isfinite(kl_after):
                        restored = f"calibration KL not finite at step {step}"
                        break
                    if kl_after < best_kl:
                        best_kl, best_at, best = kl_after, f"step {step}", _snapshot(student)
        except BaseException:
            student.load_state_dict(initial)  # an interrupted run leaves no half-trained student behind
            raise
        finally:
            bar.close()
            for p, f in flags.items():
                p.requires_grad_(f)
                p.grad = None
        if restored is not None:  # diverged: the best weights seen
            student.load_state_dict(best)
            kl_after = best_kl
            restored += f": weights of {best_at} restored (best calibration KL seen, {best_kl:.3g})"
        elif kl_after > kl_before:
            student.load_state_dict(initial)
            restored = f"calibration KL rose ({kl_before:.3g} -> {kl_after:.3g}): starting weights restored"
            kl_after = kl_before
        held_after = held_kl()
    result = DistillResult(taken, time.perf_counter() - start, kl_before, kl_after, restored, config.bn, config.lr,
                           held_before, held_after)
    (log.warning if restored else log.info)("%s", result.note())
    return result
