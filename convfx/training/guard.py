"""Divergence: notice it at the step it happens, and give the caller back weights that are not.

``finetune`` trains the caller's model in place, so a run that diverges (a learning rate
far too high, an fp16 overflow) would otherwise hand back non-finite weights, or weights
that only turn non-finite on the very last step, where no later loss could show it.

* :class:`DivergenceGuard` checks every step: the loss, and whether the step left any
  parameter or floating-point buffer non-finite (a reduction over them that NaN and
  ``inf`` both survive, see :func:`_all_finite`; buffers matter: BatchNorm statistics
  can overflow while the training loss, computed from batch statistics, stays finite).
  The result is folded into a device tensor (the first bad step), so the check itself
  never waits for the device; it is *read* only by :meth:`DivergenceGuard.poll`.  On
  the CPU reading is free and happens after every step.  On an accelerator it happens
  where the loop waits anyway -- every ``log_every`` steps, before each checkpoint and
  at each epoch end -- so divergence is noticed up to that many steps late (wasted
  compute, nothing worse), but the step it names is exact, and a checkpoint is never
  written from a diverged state.  The trade-off: no device sync per step, for a
  reduction over the weights per step -- at memory speed on the CPU, and a few
  multi-tensor kernels on an accelerator, whose launch work on the host is of the order
  of an optimizer step's and is hidden behind the GPU's work when the GPU is the
  bottleneck.
* :class:`GoodState` is an in-memory copy (on the CPU) of the model's state dict --
  parameters and buffers, e.g. BatchNorm statistics -- taken before fine-tuning and at
  the start of every epoch; it is what a diverged run restores when no newer checkpoint
  exists.
"""
from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .distributed import all_reduce_min

__all__ = ["Divergence", "DivergenceGuard", "GoodState", "UNLOGGED_POLL_EVERY"]

#: How often an accelerator run reads the guard when ``log_every`` is 0 (no logging cadence).
UNLOGGED_POLL_EVERY = 50

_NONE = torch.iinfo(torch.int64).max  # "no bad step yet": larger than any marker
_LOSS, _WEIGHTS = 0, 1  # marker = global_step * 2 + what; a bad loss sorts first within a step


class Divergence(NamedTuple):
    """The first step after which the loss or the weights were non-finite."""

    global_step: int
    loss: bool  # True: the loss was non-finite; False: the loss was finite, the weights after the step were not


class DivergenceGuard:
    """Per-step non-finite checks accumulated on the device; read only when :meth:`poll` says so."""

    def __init__(self, model: nn.Module, device: torch.device, *, global_step: int, poll_every: int,
                 distributed: bool) -> None:
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.numel() > 0]
        self._on_cpu = all(t.device.type == "cpu" for t in tensors)
        # Only what is finite now is watched: a buffer may hold -inf by design (an attention
        # mask); one device sync, once per run.
        finite = _each_finite(tensors) if tensors else []
        self.tensors = [t for t, ok in zip(tensors, finite) if ok]
        self.poll_every = max(int(poll_every), 1)
        self.distributed = distributed
        self._step = torch.tensor(global_step, dtype=torch.int64, device=device)
        self._first = torch.tensor(_NONE, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor) -> None:
        """Record the step just taken (after ``optimizer.step()``); no host-device sync."""
        with torch.no_grad():
            self._step += 1
            ok = loss_ok = torch.isfinite(loss.detach()).all().to(self._step.device)
            if self.tensors:
                ok = ok & _all_finite(self.tensors, on_cpu=self._on_cpu).to(self._step.device)
            marker = torch.where(ok, _NONE, self._step * 2 + torch.where(loss_ok, _WEIGHTS, _LOSS))
            torch.minimum(self._first, marker, out=self._first)

    def due(self, global_step: int) -> bool:
        """Whether the loop reads the guard after ``global_step`` (the same steps on every rank)."""
        return global_step % self.poll_every == 0

    def poll(self) -> Divergence | None:
        """The first bad step so far (over all ranks under DDP: a collective), or None.

        Waits for the device.  Under DDP every rank must call it at the same step.
        """
        first = self._first
        if self.distributed and dist.is_initialized():
            value = all_reduce_min(int(first.item()))
        else:
            value = int(first.item())
        if value == _NONE:
            return None
        return Divergence(global_step=value // 2, loss=value % 2 == _LOSS)


def _each_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is entirely finite (one host-device sync for all of them)."""
    first = tensors[0].device
    return torch.stack([torch.isfinite(t).all().to(first) for t in tensors]).tolist()


def _all_finite(tensors: list[torch.Tensor], *, on_cpu: bool) -> torch.Tensor:
    """A 0-d bool tensor: whether every element of ``tensors`` is finite (no host-device sync).

    Max and min, which NaN and +-inf survive and which, unlike a sum, cannot overflow.  On
    the CPU: ``amax``/``amin`` per tensor, at about memory speed (an inf-norm is many times
    slower there).  On accelerators: the inf-norm through ``get_total_norm``'s
    multi-tensor kernels (a handful of launches instead of two per tensor).
    """
    if on_cpu:
        return torch.isfinite(torch.stack([t.amax() for t in tensors] + [t.amin() for t in tensors])).all()
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is not None:
        return torch.isfinite(total_norm(tensors, norm_type=math.inf, foreach=None))
    first = tensors[0].device
    norms = [torch.linalg.vector_norm(t, math.inf).to(first, torch.float32) for t in tensors]
    return torch.isfinite(torch.stack(norms)).all()


class GoodState:
    """A CPU copy of a model's state dict (parameters and buffers), and where it was taken."""

    def __init__(self, model: nn.Module, label: str, global_step: int) -> None:
        self.label = label
        self.global_step = global_step
        self.state: dict[str, Any] = {}
        pending: set[torch.device] = set()
        for k, v in model.state_dict().items():
            if isinstance(v, torch.Tensor):
                # CUDA tensors are copied asynchronously (into pinned memory) and waited for
                # once per device below, instead of one device sync per tensor.
                self.state[k] = v.detach().to("cpu", copy=True, non_blocking=v.is_cuda)
                if v.is_cuda:
                    pending.add(v.device)
            else:
                self.state[k] = copy.deepcopy(v)
        for device in pending:
            torch.cuda.synchronize(device)

    def restore(self, model: nn.Module) -> None:
        """Copy the saved values back into ``model``'s own tensors (device and dtype kept)."""
        model.load_state_dict(self.state, strict=True)
