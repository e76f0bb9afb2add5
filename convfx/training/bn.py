"""Re-estimating BatchNorm running statistics after the convolutions before them changed."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from passes.errors import ConvfxError

from .common import capture_modes, logger, model_device, restore_modes, split_batch, unwrap

__all__ = ["recalibrate_bn"]


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    num_batches: int,
    *,
    device: torch.device | str | None = None,
) -> None:
    """Re-estimate BatchNorm running statistics from ``num_batches`` batches of ``loader``.

    Replacing a convolution by a factorization shifts the distribution its successor BN
    sees, so the stored running statistics are stale.  The statistics are reset and then
    re-accumulated as an exact cumulative average (``momentum=None``) with only the BN
    layers in train mode (dropout and friends stay in eval mode, as at inference), under
    ``no_grad``.  Momenta and every module's mode are restored afterwards; on error the
    old statistics are put back.
    """
    model = unwrap(model)
    if num_batches <= 0:
        raise ConvfxError(f"num_batches must be positive, got {num_batches}", where="recalibrate_bn")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        logger.info("recalibrate_bn: the model has no BatchNorm layers with running statistics")
        return
    if device is not None:
        model.to(device)
    modes = capture_modes(model)
    momenta = [m.momentum for m in bns]
    backup = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    ok = False
    try:
        seen = _accumulate(model, bns, loader, num_batches)
        ok = True
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        if not ok:
            _put_back(bns, backup)
        restore_modes(modes)
    if seen < num_batches:
        logger.warning("recalibrate_bn: loader ran out after %d of %d batches", seen, num_batches)
    logger.info("re-estimated statistics of %d BatchNorm layers from %d batches", len(bns), seen)


def _accumulate(model: nn.Module, bns: list[_BatchNorm], loader: Iterable[Any], num_batches: int) -> int:
    """Reset the statistics and average them afresh over up to ``num_batches``; returns how many ran."""
    dev = model_device(model)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    with torch.no_grad():
        for batch in loader:
            if seen >= num_batches:
                break
            x, _ = split_batch(batch, "recalibrate_bn")
            model(x.to(dev, non_blocking=True))
            seen += 1
    if seen == 0:
        raise ConvfxError("the loader yielded no batches", where="recalibrate_bn")
    return seen


def _put_back(bns: list[_BatchNorm], backup: list[dict[str, torch.Tensor]]) -> None:
    for m, saved in zip(bns, backup):
        for name, buf in m.named_buffers(recurse=False):
            buf.copy_(saved[name])
