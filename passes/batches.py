"""Calibration inputs: materialised once, on the model's device, whatever their source.

Why materialise: every data-aware pass (allocation sensitivities, layer fits, chain
fits) replays the same inputs several times, and a DataLoader and a generator of the same
batches must give the same result.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Batch", "calibration_batches", "first_images", "param_ref", "model_device"]

#: One calibration batch as the model's forward takes it (the labels are dropped).
Batch = tuple[Any, ...]


def param_ref(model: nn.Module) -> torch.Tensor | None:
    """The model's first parameter (its device and dtype stand for the model's), if any."""
    for p in model.parameters():
        return p
    return None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors live (CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def calibration_batches(calibration: Any, model: nn.Module, limit: int | None) -> list[Batch]:
    """The first ``limit`` batches of ``calibration`` as ``(input,)`` tuples.

    Items may be tensors or (input, label, ...) tuples; floating inputs take the model's
    device and dtype.
    """
    if calibration is None:
        return []
    ref = param_ref(model)
    device = ref.device if ref is not None else torch.device("cpu")
    out: list[Batch] = []
    try:
        iterator = iter(calibration)
    except TypeError:
        raise ValueError(f"calibration: expected an iterable of batches, got {type(calibration).__name__}") from None
    for item in iterator:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"calibration: batch {len(out)} holds {type(x).__name__}, expected a tensor")
        if ref is not None and x.is_floating_point():
            x = x.to(device=device, dtype=ref.dtype)
        out.append((x,))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError("calibration: the iterable yielded no batches")
    return out


def first_images(batches: list[Batch], n: int) -> Batch:
    """The first ``n`` calibration inputs as one batch (fewer if there are fewer)."""
    xs: list[torch.Tensor] = []
    for (x,) in batches:
        xs.append(x[:n])
        n -= int(xs[-1].shape[0])
        if n <= 0:
            break
    return (torch.cat(xs),)
