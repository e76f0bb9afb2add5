"""Calibration inputs: materialised once, on the model's device, whatever their source.

Why materialise: every data-aware pass (allocation sensitivities, layer fits, chain
fits) replays the same inputs several times, and a DataLoader and a generator of the same
batches must give the same result.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConvfxError

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


def _check_batch(x: torch.Tensor, i: int, like: torch.Tensor | None) -> None:
    """A calibration batch the model can run, or a ConvfxError naming ``calibration`` and the batch."""
    def bad(problem: str, hint: str | None = None) -> ConvfxError:
        return ConvfxError(f"batch {i} {problem}", where="calibration", hint=hint)

    if x.device.type == "meta":
        raise bad("is on the meta device: it holds no values", "pass real input tensors")
    if x.dim() == 0 or x.shape[0] == 0:
        raise bad(f"holds no inputs (shape {tuple(x.shape)}); an empty batch would be fitted as zero energy",
                  "drop empty batches from the calibration data")
    if like is not None:
        if x.dim() != like.dim():
            raise bad(f"has shape {tuple(x.shape)}, but example_inputs has {tuple(like.shape)}: "
                      f"{x.dim()} dimensions instead of {like.dim()}", "batch calibration inputs as the model's "
                      "forward takes them, e.g. (N, C, H, W) images")
        if x.dim() >= 2 and x.shape[1] != like.shape[1]:
            raise bad(f"has {x.shape[1]} channels (shape {tuple(x.shape)}), but example_inputs has "
                      f"{like.shape[1]} (shape {tuple(like.shape)})")
        if like.is_floating_point() and not x.is_floating_point():
            raise bad(f"is {str(x.dtype).removeprefix('torch.')}, not floating point",
                      "convert the images to float and normalize them as the model expects")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise bad("contains NaN or inf values")


def calibration_batches(calibration: Any, model: nn.Module, limit: int | None,
                        like: torch.Tensor | None = None) -> list[Batch]:
    """The first ``limit`` batches of ``calibration`` as ``(input,)`` tuples.

    Items may be tensors or (input, label, ...) tuples; floating inputs take the model's
    device and dtype. Each batch is checked against ``like`` (the example input): a batch
    the model cannot run, or one that would be fitted as nothing (empty, non-finite), is a
    :class:`ConvfxError` naming ``calibration`` and the batch.
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
        _check_batch(x, len(out), like)
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
    for i, (x,) in enumerate(batches):
        if x.shape[1:] != batches[0][0].shape[1:]:
            raise ConvfxError(f"batch {i} has shape {tuple(x.shape)} but batch 0 has {tuple(batches[0][0].shape)}; "
                              "measuring sensitivities stacks the first images, so they need one shape",
                              where="calibration", hint="resize the calibration images to one size")
        xs.append(x[:n])
        n -= int(xs[-1].shape[0])
        if n <= 0:
            break
    return (torch.cat(xs),)
