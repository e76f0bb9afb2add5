"""The optimizer's parameter groups and the learning-rate schedules ``finetune`` offers."""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from passes.errors import ConvfxError

from .common import unwrap
from .options import FinetuneOptions

__all__ = ["build_optimizer", "fast_forward", "make_scheduler", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: decayed weights, and BN/bias-like tensors (ndim <= 1) without decay.

    Decaying BatchNorm scales and biases only pulls them towards zero without any
    regularising benefit, which hurts the short recovery fine-tunes convfx runs.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in unwrap(model).parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR schedule, stepped after every optimizer step (``schedule``: see ``finetune``)."""
    if schedule == "onecycle":
        pct = warmup_steps / total_steps if warmup_steps else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=min(max(pct, 1e-6), 0.999),
            cycle_momentum=False,
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(
    model: nn.Module, opts: FinetuneOptions, total_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LRScheduler]:
    """``finetune``'s SGD over :func:`param_groups` and its schedule over ``total_steps``."""
    groups = param_groups(model, opts.weight_decay)
    if not groups:
        raise ConvfxError("the model has no trainable parameters", where="finetune")
    optimizer = torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=opts.nesterov)
    scheduler = make_scheduler(optimizer, opts.schedule, opts.lr, total_steps, opts.warmup_steps)
    return optimizer, scheduler


def fast_forward(scheduler: torch.optim.lr_scheduler.LRScheduler, global_step: int) -> None:
    """Put ``scheduler`` where ``global_step`` steps would have left it, without its state dict."""
    scheduler.last_epoch = global_step - 1
    with warnings.catch_warnings():
        # Stepping a scheduler "before" the optimizer warns; here no step is skipped.
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
