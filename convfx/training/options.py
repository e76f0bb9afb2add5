"""Every option of ``finetune`` in one validated, frozen dataclass.

Why one object: each argument rule is written once and checked before anything is moved,
wrapped or loaded, the loop reads typed attributes, and the configuration that a
resumable checkpoint must match is derived from it in one place
(:meth:`FinetuneOptions.fingerprint_config`).

>>> FinetuneOptions(epochs=1, lr=0.1, schedule="step")
Traceback (most recent call last):
...
passes.errors.ConvfxError: [finetune] schedule must be one of ('cosine', 'onecycle', 'constant'), got 'step'
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from passes.errors import ConvfxError

from .sampler import LoaderSpec

__all__ = ["SCHEDULES", "FinetuneOptions", "StepInfo"]

#: The values of ``schedule`` (see :func:`~.optim.make_scheduler`).
SCHEDULES = ("cosine", "onecycle", "constant")


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a ``finetune`` callback sees after each optimizer step."""

    epoch: int
    step_in_epoch: int
    steps_per_epoch: int
    global_step: int
    loss: torch.Tensor
    lr: float
    rank: int
    checkpoint_saved: bool


def _bad(msg: str) -> ConvfxError:
    return ConvfxError(msg, where="finetune")


def _finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (``lr=inf`` would pass ``> 0``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune; see :func:`convfx.train.finetune` for each field's meaning.

    Values are kept exactly as given (an int ``lr`` stays an int): they enter the
    checkpoint fingerprint, which must not change for checkpoints already written.
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    warmup_steps: int = 0
    teacher: nn.Module | None = None
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    feature_kd: float = 0.0
    feature_layers: Sequence[str] | None = None
    bn_recalibrate: int = 0
    checkpoint_dir: str | os.PathLike[str] | None = None
    checkpoint_every: int = 500
    resume: bool = True
    seed: int = 0
    max_steps_per_epoch: int | None = None
    progress: bool = True
    log_every: int = 50
    device: torch.device | str | None = None
    callback: Callable[[StepInfo], bool | None] | None = None
    dist_timeout_s: float | None = None

    def __post_init__(self) -> None:
        # The order of the checks decides which message a call with several mistakes gets.
        self._check_schedule()
        self._check_distillation()
        self._check_counts()
        self._check_sgd()

    def _check_schedule(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise _bad(f"epochs must be a positive int, got {self.epochs!r}")
        if not (_finite(self.lr) and self.lr > 0):
            raise _bad(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise _bad(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise _bad("warmup_steps must be >= 0")

    def _check_distillation(self) -> None:
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise _bad(f"kd_alpha must be in [0, 1], got {self.kd_alpha!r}")
        if not (_finite(self.kd_temperature) and self.kd_temperature > 0):
            raise _bad(f"kd_temperature must be a finite number > 0, got {self.kd_temperature!r}")
        fkd = self.feature_kd
        if not (isinstance(fkd, (int, float)) and math.isfinite(fkd) and fkd >= 0):
            raise _bad(f"feature_kd must be a finite number >= 0, got {fkd!r}")
        if fkd > 0 and self.teacher is None:
            raise _bad("feature_kd > 0 needs a teacher to match")

    def _check_counts(self) -> None:
        if self.bn_recalibrate < 0:
            raise _bad("bn_recalibrate must be >= 0")
        if self.checkpoint_every < 0:
            raise _bad("checkpoint_every must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise _bad("max_steps_per_epoch must be >= 1 or None")

    def _check_sgd(self) -> None:
        if self.nesterov and not self.momentum > 0:
            raise _bad("nesterov=True needs a positive momentum")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (_finite(value) and value >= 0):
                raise _bad(f"{name} must be a finite number >= 0, got {value!r}")

    def fingerprint_config(self, spec: LoaderSpec, num_samples: int, feature_layers: list[str]) -> dict[str, Any]:
        """What a checkpoint must have been written with to be resumed by this run.

        Keys and values are frozen: checkpoints store this dict and its hash, and a run
        resumes only one whose hash matches.  Options that do not change the trajectory
        (where to checkpoint, logging, the device) are left out.
        """
        config: dict[str, Any] = {
            "epochs": self.epochs, "lr": self.lr, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "nesterov": self.nesterov,
            "schedule": self.schedule, "warmup_steps": self.warmup_steps,
            "distill": [self.kd_alpha, self.kd_temperature] if self.teacher is not None else None,
            "bn_recalibrate": self.bn_recalibrate, "seed": self.seed,
            "max_steps_per_epoch": self.max_steps_per_epoch, "batch_size": spec.batch_size,
            "shuffle": spec.shuffle, "drop_last": spec.drop_last, "num_samples": num_samples,
        }
        if self.feature_kd > 0:  # only then: checkpoints of runs without it keep their fingerprint
            config["feature_kd"] = [self.feature_kd, feature_layers]
        return config
