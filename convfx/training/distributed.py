"""Process-group set-up under ``torchrun`` and the few collectives fine-tuning needs."""
from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from passes.errors import ConvfxError

from .common import logger, model_device

__all__ = [
    "DEFAULT_DIST_TIMEOUT_S",
    "DistInfo",
    "all_reduce_min",
    "all_reduce_sum",
    "cleanup_distributed",
    "distributed_info",
    "init_distributed",
    "is_comm_failure",
    "training_device",
]

#: Seconds a collective may wait before a crashed peer becomes an error instead of a hang.
DEFAULT_DIST_TIMEOUT_S = 600.0


class DistInfo(NamedTuple):
    """Where this process stands in a (possibly absent) distributed job."""

    rank: int
    world_size: int
    local_rank: int
    initialized: bool


def distributed_info() -> DistInfo:
    """Rank/world size from an initialised process group, else from torchrun's env vars."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)
    return DistInfo(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank, False
    )


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    env = os.environ.get("CONVFX_DIST_TIMEOUT_S")
    return float(env) if env else DEFAULT_DIST_TIMEOUT_S


def init_distributed(backend: str | None = None, *, timeout_s: float | None = None) -> bool:
    """Initialise the default process group when launched by ``torchrun`` (WORLD_SIZE > 1).

    Uses NCCL when CUDA is available and gloo otherwise.  Collectives time out after
    ``timeout_s`` seconds (default: ``$CONVFX_DIST_TIMEOUT_S`` or 600) so that a crashed
    peer turns into an error instead of a hang.  Returns True if this call created the
    group (and the caller should eventually call :func:`cleanup_distributed`).
    """
    info = distributed_info()
    if info.initialized or info.world_size <= 1:
        return False
    if not dist.is_available():
        raise ConvfxError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=_timeout_s(timeout_s)))
    logger.debug("initialised %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return True


def training_device(requested: torch.device | str | None, model: nn.Module, distributed: bool) -> torch.device:
    """``requested``, else this rank's GPU under NCCL, else wherever the model already is."""
    if requested is not None:
        return torch.device(requested)
    if distributed and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(model_device(model))


def cleanup_distributed() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum ``values`` over ranks (in float64: sample counts must stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's ``value`` (an int64; e.g. the first step that went wrong)."""
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a failed collective (a peer crashed or timed out)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and bool(
        re.search(r"gloo|nccl|connection (closed|reset)|timed? ?out|peer", str(exc), re.IGNORECASE)
    )
