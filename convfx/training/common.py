"""Small model and batch helpers shared by evaluation, BN re-estimation and training."""
from __future__ import annotations

import logging
from collections.abc import Sized
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from passes.batches import model_device
from passes.errors import ConvfxError

__all__ = [
    "capture_modes",
    "logger",
    "model_device",
    "progress_disabled",
    "restore_modes",
    "safe_len",
    "split_batch",
    "unwrap",
]

#: One logger for the whole package, under the name it had before the split into modules,
#: so that users' logging configuration for ``convfx.train`` keeps applying.
logger = logging.getLogger("convfx.train")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (its state dict and submodule names are the user's)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def capture_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Every submodule's train/eval flag, so that callers get back exactly what they had."""
    return {m: m.training for m in model.modules()}


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    """Undo :func:`capture_modes` (per module: a parent's ``train()`` would not)."""
    for m, training in modes.items():
        m.training = training


def split_batch(batch: Any, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets, *extra)``, ``(inputs,)`` or a bare input tensor."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) >= 2 else None)
    raise ConvfxError(
        f"cannot interpret a batch of type {type(batch).__name__}",
        where=where,
        hint="loaders must yield (inputs, targets) tuples of tensors",
    )


def progress_disabled(progress: bool, rank: int) -> bool | None:
    """tqdm's ``disable``: only rank 0 draws bars."""
    # None lets tqdm switch itself off when stderr is not a terminal.
    return True if (not progress or rank != 0) else None


def safe_len(obj: Any) -> int | None:
    """``len(obj)`` where it has one (a progress bar's total), else None."""
    try:
        return len(obj) if isinstance(obj, Sized) else None
    except TypeError:
        return None
