"""Top-1/top-5 evaluation, on one process or summed over the ranks of a DDP job."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from passes.errors import ConvfxError

from .common import capture_modes, model_device, progress_disabled, restore_modes, safe_len, split_batch, unwrap
from .distributed import all_reduce_sum, distributed_info

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    distributed: bool | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent), mean cross-entropy and the number of images.

    Runs where the model's parameters live (or moves the model to ``device``), in eval
    mode under ``torch.inference_mode``, and restores every submodule's train/eval flag
    afterwards.  Top-5 uses ``k = min(5, num_classes)``.  With ``distributed`` (default:
    whenever a process group with several ranks is up) the counts are summed over ranks,
    so each rank should see its own shard of the data.
    """
    model = unwrap(model)
    if device is not None:
        model.to(device)
    info = distributed_info()
    if distributed is None:
        distributed = info.initialized and info.world_size > 1
    total = safe_len(loader)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    modes = capture_modes(model)
    bar = tqdm(total=total, desc=desc, disable=progress_disabled(progress, info.rank), leave=False)
    try:
        model.eval()
        with torch.inference_mode():
            stats = _count(model, loader, max_batches, bar)
    finally:
        bar.close()
        restore_modes(modes)
    if distributed:
        stats = all_reduce_sum(stats)
    n = int(round(stats[3]))
    if n == 0:
        raise ConvfxError("the evaluation loader yielded no samples", where="evaluate")
    return {
        "top1": 100.0 * stats[0] / n,
        "top5": 100.0 * stats[1] / n,
        "loss": stats[2] / n,
        "n": n,
    }


def _count(model: nn.Module, loader: Iterable[Any], max_batches: int | None, bar: Any) -> list[float]:
    """``[top-1 hits, top-5 hits, summed loss, samples]`` over the loader.

    The sums stay on the device until the end: reading them per batch would wait for it.
    """
    dev = model_device(model)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    correct1, correct5, loss_sum = zero, zero, zero
    count = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = split_batch(batch, "evaluate")
        if y is None:
            raise ConvfxError("evaluation needs (inputs, targets) batches", where="evaluate")
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ConvfxError("model output must be a (batch, classes) tensor of logits", where="evaluate")
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(y.view(-1, 1))
        correct1 = correct1 + hits[:, 0].sum()
        correct5 = correct5 + hits.any(dim=1).sum()
        loss_sum = loss_sum + F.cross_entropy(logits.float(), y, reduction="sum").double()
        count += y.numel()
        bar.update(1)
    return [float(correct1), float(correct5), float(loss_sum), float(count)]
