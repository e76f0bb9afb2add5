"""Evaluation and recovery fine-tuning of compressed models.

Factorizing convolutions costs accuracy that a short fine-tune (optionally distilled from
the uncompressed model, optionally after re-estimating BatchNorm statistics) recovers.
Such runs are long, so they checkpoint and resume exactly: a run that is killed and
resumed ends, on CPU with fixed seeds and the same thread count, with the very same bits
as one that was never interrupted.

Reproducibility contract (what makes exact resume possible):

* The order of samples in epoch ``e`` is a pure function of ``(seed, e)``
  (:class:`DeterministicBatchSampler`); a resumed epoch skips its finished batches
  without loading them.
* Before each sample is loaded, the torch, ``random`` and numpy RNGs *of the process
  that loads it* are seeded from ``(seed, epoch, position in the epoch)``.  Random
  augmentation in ``dataset[i]`` is therefore reproducible no matter how many loader
  workers there are, which worker fetches which batch, or where a resume starts.
  (Randomness that a dataset keeps in its own private generator is not covered.)
* Before each training step the RNGs are seeded from ``(seed, epoch, step, rank)``, so
  dropout and other forward-pass randomness are reproducible too.
* Everything else that evolves (weights, buffers, optimizer, LR schedule, loss sums,
  history) is in the checkpoint.

On CUDA some kernels (e.g. the backward of adaptive average pooling) are
nondeterministic, so there even two uninterrupted runs differ in the last bits; a resumed
run restores the same state but cannot be more exact than that.

Under DDP (``torchrun``) a global step consumes ``world_size * batch_size`` consecutive
samples of the epoch order, split evenly among ranks.  Resuming with the same world size
is exact up to the summation order of the gradient all-reduce; resuming with a different
world size continues at the first unseen sample of the epoch but is, necessarily, a
different run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from tqdm.auto import tqdm

from passes.errors import ConvfxError

from .checkpoint import atomic_save, load_checkpoint, load_state_dict_strict, remove_partial_saves

try:  # numpy is optional for torch; seed it when it is there
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = [
    "CHECKPOINT_NAME",
    "DeterministicBatchSampler",
    "DistInfo",
    "StepInfo",
    "cleanup_distributed",
    "default_feature_layers",
    "distillation_loss",
    "distributed_info",
    "evaluate",
    "feature_distillation_loss",
    "finetune",
    "init_distributed",
    "param_groups",
    "recalibrate_bn",
]

logger = logging.getLogger(__name__)

#: File name of the resumable checkpoint inside ``checkpoint_dir``.
CHECKPOINT_NAME = "last.pt"
_FORMAT = "convfx.finetune/1"
_SCHEDULES = ("cosine", "onecycle", "constant")
_DEFAULT_DIST_TIMEOUT_S = 600.0


# --------------------------------------------------------------------------- utilities


def _mix(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % (1 << 32))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _capture_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


def _split_batch(batch: Any, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def _progress_disabled(progress: bool, rank: int) -> bool | None:
    # None lets tqdm switch itself off when stderr is not a terminal.
    return True if (not progress or rank != 0) else None


def _safe_len(obj: Any) -> int | None:
    try:
        return len(obj) if isinstance(obj, Sized) else None
    except TypeError:
        return None


# ------------------------------------------------------------------------ distributed


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
    return float(env) if env else _DEFAULT_DIST_TIMEOUT_S


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


def cleanup_distributed() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def _is_comm_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and bool(
        re.search(r"gloo|nccl|connection (closed|reset)|timed? ?out|peer", str(exc), re.IGNORECASE)
    )


# ------------------------------------------------------------------------- evaluation


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
    model = _unwrap(model)
    if device is not None:
        model.to(device)
    dev = _model_device(model)
    info = distributed_info()
    if distributed is None:
        distributed = info.initialized and info.world_size > 1
    total = _safe_len(loader)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    correct1, correct5, loss_sum = zero, zero, zero
    count = 0
    modes = _capture_modes(model)
    bar = tqdm(total=total, desc=desc, disable=_progress_disabled(progress, info.rank), leave=False)
    try:
        model.eval()
        with torch.inference_mode():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _split_batch(batch, "evaluate")
                if y is None:
                    raise ConvfxError("evaluation needs (inputs, targets) batches", where="evaluate")
                x = x.to(dev, non_blocking=True)
                y = y.to(dev, non_blocking=True)
                logits = model(x)
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                    raise ConvfxError(
                        "model output must be a (batch, classes) tensor of logits",
                        where="evaluate",
                    )
                k = min(5, logits.shape[1])
                hits = logits.topk(k, dim=1).indices.eq(y.view(-1, 1))
                correct1 = correct1 + hits[:, 0].sum()
                correct5 = correct5 + hits.any(dim=1).sum()
                loss_sum = loss_sum + F.cross_entropy(logits.float(), y, reduction="sum").double()
                count += y.numel()
                bar.update(1)
    finally:
        bar.close()
        _restore_modes(modes)
    stats = [float(correct1), float(correct5), float(loss_sum), float(count)]
    if distributed:
        stats = _all_reduce_sum(stats)
    n = int(round(stats[3]))
    if n == 0:
        raise ConvfxError("the evaluation loader yielded no samples", where="evaluate")
    return {
        "top1": 100.0 * stats[0] / n,
        "top5": 100.0 * stats[1] / n,
        "loss": stats[2] / n,
        "n": n,
    }


# ----------------------------------------------------------------- losses, BN, groups


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The KL term is averaged over the batch; the ``T^2`` factor keeps its gradient scale
    independent of the temperature (Hinton et al.).
    """
    t = float(temperature)
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    ce = F.cross_entropy(student_logits, targets)
    return alpha * t * t * kd + (1.0 - alpha) * ce


def feature_distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``||s - t||^2 / ||t||^2``: each layer's relative output error.

    Relative, so that a layer's weight does not depend on its activation scale (a BN
    output with large gamma would otherwise dominate).  The teacher side carries no grad.
    """
    if len(student) != len(teacher) or not student:
        raise ConvfxError(f"feature distillation got {len(student)} student and {len(teacher)} teacher "
                          "outputs; a hooked module ran a different number of times", where="finetune")
    terms = [
        (s.float() - t.detach().float()).pow(2).sum() / t.detach().float().pow(2).sum().clamp_min(1e-12)
        for s, t in zip(student, teacher)
    ]
    return torch.stack(terms).mean()


def default_feature_layers(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Names of the BatchNorm modules present in both models: the points feature distillation matches.

    Why BN outputs: a factorized conv keeps its BN and its output shape, the BN is a leaf
    module in an fx graph too (blocks are inlined there, so block-level hooks would never
    fire), and it sits at every conv's output.
    """
    t_names = {n for n, m in teacher.named_modules() if isinstance(m, _BatchNorm)}
    return [n for n, m in _unwrap(student).named_modules() if isinstance(m, _BatchNorm) and n in t_names]


class _FeatureTap:
    """Forward hooks that collect the outputs of the same named modules in student and teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: list[str]) -> None:
        self.names = names
        self.out: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
        self.active = False  # only the training forward passes record (not eval or BN passes)
        found: list[tuple[str, nn.Module]] = []  # all resolved before any hook goes in
        for side, model in (("s", _unwrap(student)), ("t", teacher)):
            for name in names:
                try:
                    found.append((side, model.get_submodule(name)))
                except AttributeError as exc:
                    who = "student" if side == "s" else "teacher"
                    raise ConvfxError(f"feature_layers names {name!r}, which the {who} does not have",
                                      where="finetune") from exc
        self.handles = [mod.register_forward_hook(self._hook(side)) for side, mod in found]

    def _hook(self, side: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            if self.active:
                self.out[side].append(output)
        return hook

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        s, t = self.out["s"], self.out["t"]
        self.out = {"s": [], "t": []}
        for name, a, b in zip(self.names, s, t):
            if a.shape != b.shape:
                raise ConvfxError(f"feature layer {name!r}: student output {tuple(a.shape)} vs teacher "
                                  f"{tuple(b.shape)}", where="finetune",
                                  hint="name layers whose outputs keep their shape after compression")
        return s, t

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: decayed weights, and BN/bias-like tensors (ndim <= 1) without decay.

    Decaying BatchNorm scales and biases only pulls them towards zero without any
    regularising benefit, which hurts the short recovery fine-tunes convfx runs.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in _unwrap(model).parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


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
    model = _unwrap(model)
    if num_batches <= 0:
        raise ConvfxError(f"num_batches must be positive, got {num_batches}", where="recalibrate_bn")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        logger.info("recalibrate_bn: the model has no BatchNorm layers with running statistics")
        return
    if device is not None:
        model.to(device)
    dev = _model_device(model)
    modes = _capture_modes(model)
    momenta = [m.momentum for m in bns]
    backup = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    seen = 0
    ok = False
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.eval()
        for m in bns:
            m.train()
        with torch.no_grad():
            for batch in loader:
                if seen >= num_batches:
                    break
                x, _ = _split_batch(batch, "recalibrate_bn")
                model(x.to(dev, non_blocking=True))
                seen += 1
        if seen == 0:
            raise ConvfxError("the loader yielded no batches", where="recalibrate_bn")
        ok = True
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        if not ok:
            for m, saved in zip(bns, backup):
                for name, buf in m.named_buffers(recurse=False):
                    buf.copy_(saved[name])
        _restore_modes(modes)
    if seen < num_batches:
        logger.warning("recalibrate_bn: loader ran out after %d of %d batches", seen, num_batches)
    logger.info("re-estimated statistics of %d BatchNorm layers from %d batches", len(bns), seen)


# -------------------------------------------------------------------------- sampling


class DeterministicBatchSampler(Sampler[list[Any]]):
    """One rank's batches of one epoch, a pure function of its arguments.

    The epoch order is a permutation seeded by ``(seed, epoch)`` (or ``range(n)`` without
    shuffling), the same for every world size.  Global step ``s`` takes the
    ``world_size * batch_size`` samples at ``s * world_size * batch_size`` and gives rank
    ``r`` the ``r``-th equal share.  Without ``drop_last`` and with several ranks the
    order is padded by wrapping around (as ``DistributedSampler`` does) so that every
    rank runs the same number of equally sized steps.  ``start_step`` skips finished
    steps without touching their data.  With ``with_sample_seeds`` each index comes as
    ``(index, seed)``, the seed being derived from the sample's position in the epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        max_steps: int | None = None,
        with_sample_seeds: bool = False,
    ) -> None:
        if batch_size <= 0 or num_samples < 0 or not 0 <= rank < world_size:
            raise ConvfxError(
                f"invalid sampler arguments: num_samples={num_samples} batch_size={batch_size} "
                f"rank={rank} world_size={world_size}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.num_steps = self.steps_per_epoch(num_samples, batch_size, world_size, drop_last, max_steps)
        self.with_sample_seeds = with_sample_seeds

    @staticmethod
    def _padded(num_samples: int, world_size: int, drop_last: bool) -> int:
        if drop_last or world_size == 1 or num_samples == 0:
            return num_samples
        return -(-num_samples // world_size) * world_size

    @staticmethod
    def steps_per_epoch(
        num_samples: int, batch_size: int, world_size: int = 1, drop_last: bool = False,
        max_steps: int | None = None,
    ) -> int:
        """Number of (global) steps in one epoch."""
        global_batch = batch_size * world_size
        if drop_last:
            steps = num_samples // global_batch
        else:
            steps = -(-DeterministicBatchSampler._padded(num_samples, world_size, False) // global_batch)
        return steps if max_steps is None else min(steps, max_steps)

    def order(self) -> torch.Tensor:
        """The (padded) global sample order of this epoch."""
        n = self.num_samples
        if self.shuffle:
            gen = torch.Generator().manual_seed(_mix(self.seed, "order", self.epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        padded = self._padded(n, self.world_size, self.drop_last)
        if padded > n:
            order = order.repeat(-(-padded // n))[:padded]
        return order

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)

    def __iter__(self) -> Iterator[list[Any]]:
        order = self.order().tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.num_steps):
            lo = step * global_batch
            chunk = order[lo : lo + global_batch]
            share = len(chunk) // self.world_size
            first = self.rank * share
            mine = chunk[first : first + share]
            if self.with_sample_seeds:
                yield [
                    (i, _mix(self.seed, "sample", self.epoch, lo + first + j)) for j, i in enumerate(mine)
                ]
            else:
                yield mine


class _SeededSamples(Dataset[Any]):
    """Seeds the loading process's RNGs per sample so augmentation is reproducible."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        _seed_all(seed)
        return self.dataset[index]


def _loader_spec(loader: DataLoader, where: str) -> tuple[int, bool, bool]:
    """(batch_size, shuffle, drop_last) of a loader whose sampling we must reproduce."""
    if not isinstance(loader, DataLoader):
        raise ConvfxError(
            f"expected a torch DataLoader, got {type(loader).__name__}",
            where=where,
            hint="resumable training re-creates the per-epoch order from loader.dataset",
        )
    if isinstance(loader.dataset, IterableDataset):
        raise ConvfxError(
            "iterable-style datasets cannot be resumed mid-epoch",
            where=where,
            hint="use a map-style dataset (with __getitem__ and __len__)",
        )
    if loader.batch_size is None:
        raise ConvfxError(
            "the loader has no batch_size (custom batch_sampler or batching disabled)",
            where=where,
            hint="build the DataLoader with batch_size=... and shuffle=True/False",
        )
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler._num_samples is not None:
            raise ConvfxError("RandomSampler with replacement/num_samples is not supported", where=where)
        shuffle = True
    elif isinstance(sampler, SequentialSampler):
        shuffle = False
    elif isinstance(sampler, DistributedSampler):
        shuffle = sampler.shuffle
        logger.info("%s: ignoring its DistributedSampler; convfx shards the data itself", where)
    else:
        raise ConvfxError(
            f"unsupported sampler {type(sampler).__name__}",
            where=where,
            hint="pass a DataLoader built with shuffle=True or shuffle=False",
        )
    return loader.batch_size, shuffle, loader.drop_last


def _rebuild_loader(
    template: DataLoader,
    dataset: Dataset[Any],
    *,
    seed: int,
    batch_sampler: Sampler[Any] | None = None,
    sampler: Iterable[int] | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    """A DataLoader like ``template`` (workers, collate, pinning) over our own sampling."""
    kw: dict[str, Any] = {}
    if batch_sampler is not None:
        kw["batch_sampler"] = batch_sampler
    else:
        kw.update(sampler=sampler, batch_size=batch_size, drop_last=False)
    if template.num_workers > 0:
        kw.update(prefetch_factor=template.prefetch_factor,
                  multiprocessing_context=template.multiprocessing_context)
    return DataLoader(
        dataset,
        num_workers=template.num_workers,
        collate_fn=template.collate_fn,
        pin_memory=template.pin_memory,
        timeout=template.timeout,
        worker_init_fn=template.worker_init_fn,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def _shard_eval_loader(loader: Iterable[Any], rank: int, world: int) -> tuple[Iterable[Any], bool]:
    """Each rank's disjoint share of a validation loader (no padding: counts stay exact)."""
    if world == 1 or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader, False
    if loader.batch_size is None:
        return loader, False
    n = len(loader.dataset)  # type: ignore[arg-type]
    return (
        _rebuild_loader(loader, loader.dataset, seed=0, sampler=list(range(rank, n, world)),
                        batch_size=loader.batch_size),
        True,
    )


# ------------------------------------------------------------------------ RNG states


def _rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and plain types (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------ fine-tuning


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


def _make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
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


class _Stopped(Exception):
    """Internal: a callback asked to stop after a checkpoint."""


class _Run:
    """State and steps of one ``finetune`` call (split out only for readability)."""

    def __init__(self, model: nn.Module, train_loader: DataLoader, val_loader: Iterable[Any] | None,
                 args: dict[str, Any]) -> None:
        self.a = args
        self.model = model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.batch_size, self.shuffle, self.drop_last = _loader_spec(train_loader, "finetune: train_loader")
        self.dataset = train_loader.dataset
        self.num_samples = len(self.dataset)  # type: ignore[arg-type]

        init_distributed(timeout_s=args["dist_timeout_s"])  # left up for later evaluate() calls
        info = distributed_info()
        self.rank, self.world = info.rank, info.world_size
        self.distributed = info.initialized and self.world > 1

        dev = args["device"]
        if dev is None:
            if self.distributed and dist.get_backend() == "nccl":
                dev = torch.device("cuda", torch.cuda.current_device())
            else:
                dev = _model_device(model)
        self.device = torch.device(dev)
        model.to(self.device)
        self.teacher: nn.Module | None = args["teacher"]
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.tap: _FeatureTap | None = None
        self.feature_layers: list[str] = []
        if args["feature_kd"] > 0:
            assert self.teacher is not None  # checked in _check_args
            names = args["feature_layers"]
            self.feature_layers = (default_feature_layers(model, self.teacher) if names is None
                                   else list(names))
            if not self.feature_layers:
                raise ConvfxError("feature_kd > 0 but there are no feature layers to match (the default "
                                  "is every BatchNorm both models share)", where="finetune",
                                  hint="pass feature_layers=[module names]")

        self.steps_per_epoch = DeterministicBatchSampler.steps_per_epoch(
            self.num_samples, self.batch_size, self.world, self.drop_last, args["max_steps_per_epoch"]
        )
        if self.steps_per_epoch == 0:
            raise ConvfxError(
                f"an epoch has no steps: {self.num_samples} samples, batch size {self.batch_size} "
                f"x {self.world} rank(s), drop_last={self.drop_last}",
                where="finetune",
            )
        self.total_steps = self.steps_per_epoch * args["epochs"]
        if args["schedule"] == "onecycle" and args["warmup_steps"] >= self.total_steps:
            raise ConvfxError(
                f"warmup_steps ({args['warmup_steps']}) must be below the {self.total_steps} total steps",
                where="finetune",
            )

        groups = param_groups(model, args["weight_decay"])
        if not groups:
            raise ConvfxError("the model has no trainable parameters", where="finetune")
        self.optimizer = torch.optim.SGD(
            groups, lr=args["lr"], momentum=args["momentum"], nesterov=args["nesterov"]
        )
        self.scheduler = _make_scheduler(
            self.optimizer, args["schedule"], args["lr"], self.total_steps, args["warmup_steps"]
        )
        self.train_model: nn.Module = model
        if self.distributed:
            self.train_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

        self.config = {
            "epochs": args["epochs"], "lr": args["lr"], "momentum": args["momentum"],
            "weight_decay": args["weight_decay"], "nesterov": args["nesterov"],
            "schedule": args["schedule"], "warmup_steps": args["warmup_steps"],
            "distill": [args["kd_alpha"], args["kd_temperature"]] if self.teacher is not None else None,
            "bn_recalibrate": args["bn_recalibrate"], "seed": args["seed"],
            "max_steps_per_epoch": args["max_steps_per_epoch"], "batch_size": self.batch_size,
            "shuffle": self.shuffle, "drop_last": self.drop_last, "num_samples": self.num_samples,
        }
        if args["feature_kd"] > 0:  # only then: checkpoints of runs without it keep their fingerprint
            self.config["feature_kd"] = [args["feature_kd"], self.feature_layers]
        self.fingerprint = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]
        ckpt_dir = args["checkpoint_dir"]
        self.ckpt_path: Path | None = Path(ckpt_dir) / CHECKPOINT_NAME if ckpt_dir is not None else None

        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.samples = 0
        self.seconds = 0.0
        self.resumed_from: int | None = None
        self.stop_requested = False
        self.last_saved_step: int | None = None
        if self.feature_layers:  # last: nothing below may raise and leave hooks behind
            self.tap = _FeatureTap(model, self.teacher, self.feature_layers)

    # ----------------------------------------------------------------- checkpoints

    def _accum_global(self) -> tuple[float, int]:
        loss_sum, samples = float(self.loss_sum), self.samples
        if self.distributed:
            loss_sum, s = _all_reduce_sum([loss_sum, float(samples)])
            samples = int(round(s))
        return loss_sum, samples

    def save(self, epoch: int, step_in_epoch: int) -> bool:
        """Write last.pt (rank 0). Collective under DDP: every rank must call it."""
        if self.ckpt_path is None:
            return False
        loss_sum, samples = self._accum_global()
        if not math.isfinite(loss_sum):
            raise ConvfxError(
                f"training loss became non-finite before global step {self.global_step}",
                where="finetune",
                hint="lower the learning rate; the last good checkpoint was kept",
            )
        if self.rank == 0:
            state = {
                "format": _FORMAT,
                "fingerprint": self.fingerprint,
                "config": self.config,
                "world_size": self.world,
                "steps_per_epoch": self.steps_per_epoch,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": self.global_step,
                "complete": epoch >= self.a["epochs"],
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
                "epoch_accum": {"loss_sum": loss_sum, "samples": samples, "seconds": self.seconds},
                "history": self.history,
            }
            atomic_save(state, self.ckpt_path)
        self.last_saved_step = self.global_step
        return True

    def try_resume(self) -> None:
        path = self.ckpt_path
        if path is None:
            return
        if self.rank == 0:
            remove_partial_saves(path)
        found = path.exists()
        if found and not self.a["resume"]:
            if self.rank == 0:
                logger.warning("resume=False: %s will be overwritten by a fresh run", path)
            found = False
        if self.distributed:
            have = _all_reduce_sum([1.0 if found else 0.0])[0]
            if have not in (0.0, float(self.world)):
                raise ConvfxError(
                    f"only {int(have)} of {self.world} ranks can see {path}",
                    where="finetune",
                    hint="checkpoint_dir must be on a file system shared by all ranks",
                )
        if not found:
            return
        where = str(path)
        ckpt = load_checkpoint(path, map_location="cpu")
        if ckpt.get("format") != _FORMAT:
            raise ConvfxError(f"not a convfx fine-tuning checkpoint (format {ckpt.get('format')!r})", where=where)
        load_state_dict_strict(self.model, ckpt["model"], where=where)
        if ckpt["fingerprint"] != self.fingerprint:
            old = ckpt.get("config", {})
            diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            raise ConvfxError(
                "checkpoint was written by a run with a different configuration ("
                + ", ".join(f"{k}: {old.get(k)!r} -> {self.config.get(k)!r}" for k in diff) + ")",
                where=where,
                hint="use another checkpoint_dir, or resume=False to start over",
            )
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ConvfxError(f"optimizer state does not fit: {exc}", where=where) from exc

        epoch, step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        if ckpt["world_size"] == self.world and ckpt["steps_per_epoch"] == self.steps_per_epoch:
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.global_step = int(ckpt["global_step"])
        else:
            # Continue at the first sample of the epoch that no step has consumed yet.
            done = min(step * self.batch_size * int(ckpt["world_size"]), self.num_samples)
            new_step = min(done // (self.batch_size * self.world), self.steps_per_epoch)
            if epoch >= self.a["epochs"]:
                new_step = 0
            logger.warning(
                "world size changed (%d -> %d): resuming epoch %d at sample %d (step %d); the "
                "result will not be bit-identical to an uninterrupted run",
                ckpt["world_size"], self.world, epoch, new_step * self.batch_size * self.world, new_step,
            )
            step = new_step
            self.global_step = min(epoch * self.steps_per_epoch + step, self.total_steps)
            self.scheduler.last_epoch = self.global_step - 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        self.epoch, self.step_in_epoch = epoch, step
        _set_rng_state(ckpt["rng"])
        self.history = list(ckpt["history"])
        acc = ckpt["epoch_accum"]
        if self.rank == 0 and step > 0:
            self.loss_sum.fill_(acc["loss_sum"])
            self.samples = int(acc["samples"])
        self.seconds = float(acc["seconds"]) if step > 0 else 0.0
        self.resumed_from = self.global_step
        self.last_saved_step = self.global_step
        if self.rank == 0:
            logger.info("resumed from %s at epoch %d, step %d (global step %d)", path, epoch, step, self.global_step)

    # ---------------------------------------------------------------------- steps

    def epoch_loader(self, epoch: int, start_step: int, *, rank: int, world: int,
                     max_steps: int | None) -> DataLoader:
        sampler = DeterministicBatchSampler(
            self.num_samples, self.batch_size, seed=self.a["seed"], epoch=epoch,
            shuffle=self.shuffle, drop_last=self.drop_last, rank=rank, world_size=world,
            start_step=start_step, max_steps=max_steps, with_sample_seeds=True,
        )
        return _rebuild_loader(
            self.train_loader, _SeededSamples(self.dataset), batch_sampler=sampler,
            seed=_mix(self.a["seed"], "workers", epoch, rank),
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.tap is not None:
            self.tap.active = True
        try:
            out = self.train_model(x)
            if self.teacher is None:
                return F.cross_entropy(out, y)
            with torch.no_grad():
                t_out = self.teacher(x)
        finally:
            if self.tap is not None:
                self.tap.active = False
        loss = distillation_loss(out, t_out, y, alpha=self.a["kd_alpha"], temperature=self.a["kd_temperature"])
        if self.tap is not None:
            loss = loss + self.a["feature_kd"] * feature_distillation_loss(*self.tap.take())
        return loss

    def run(self) -> None:
        a = self.a
        epochs, spe = a["epochs"], self.steps_per_epoch
        callback: Callable[[StepInfo], bool | None] | None = a["callback"]
        if self.resumed_from is None and a["bn_recalibrate"] > 0:
            # Same batches on every rank, so all ranks end with identical statistics.
            recal = self.epoch_loader(-1, 0, rank=0, world=1, max_steps=a["bn_recalibrate"])
            recalibrate_bn(self.model, recal, a["bn_recalibrate"])
        disabled = _progress_disabled(a["progress"], self.rank)
        start_epoch, start_step = self.epoch, self.step_in_epoch
        for epoch in range(start_epoch, epochs):
            first = start_step if epoch == start_epoch else 0
            self.epoch, self.step_in_epoch = epoch, first
            self.model.train()
            if self.teacher is not None:
                self.teacher.eval()
            if first < spe:
                loader = self.epoch_loader(epoch, first, rank=self.rank, world=self.world,
                                           max_steps=a["max_steps_per_epoch"])
                bar = tqdm(total=spe, initial=first, desc=f"epoch {epoch + 1}/{epochs}",
                           disable=disabled, leave=False)
                t0 = time.perf_counter()
                try:
                    for i, batch in enumerate(loader, start=first):
                        self.step(epoch, i, batch, callback, bar)
                finally:
                    bar.close()
                    self.seconds += time.perf_counter() - t0
            self.end_epoch(epoch)
            if self.stop_requested:
                raise _Stopped

    def step(self, epoch: int, i: int, batch: Any, callback: Callable[[StepInfo], bool | None] | None,
             bar: Any) -> None:
        a = self.a
        x, y = _split_batch(batch, "finetune")
        if y is None:
            raise ConvfxError("training needs (inputs, targets) batches", where="finetune")
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        # Forward-pass randomness (dropout...) as a function of the step alone.
        _seed_all(_mix(a["seed"], "step", epoch, i, self.rank))
        loss = self.loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        done = i + 1
        self.step_in_epoch = done
        self.loss_sum += loss.detach().double() * y.shape[0]
        self.samples += y.shape[0]
        bar.update(1)
        if a["log_every"] and self.global_step % a["log_every"] == 0:
            # Only here (and at checkpoints) do we wait for the device to read the loss.
            value = float(loss)
            if not math.isfinite(value):
                raise ConvfxError(
                    f"training loss is {value} at epoch {epoch + 1}, step {done}",
                    where="finetune", hint="lower the learning rate",
                )
            bar.set_postfix(loss=f"{value:.4f}")
            if self.rank == 0:
                logger.info(
                    "epoch %d step %d/%d: loss %.4f (epoch mean %.4f), lr %.4g",
                    epoch + 1, done, self.steps_per_epoch, value,
                    float(self.loss_sum) / max(self.samples, 1), self.optimizer.param_groups[0]["lr"],
                )
        saved = False
        every = a["checkpoint_every"]
        if every and self.global_step % every == 0 and done < self.steps_per_epoch:
            saved = self.save(epoch, done)
        if callback is not None:
            info = StepInfo(epoch, done, self.steps_per_epoch, self.global_step, loss.detach(),
                            self.optimizer.param_groups[0]["lr"], self.rank, saved)
            if callback(info) is True:
                if done < self.steps_per_epoch:
                    if not saved:
                        self.save(epoch, done)
                    raise _Stopped
                self.stop_requested = True  # after this epoch's validation and checkpoint

    def end_epoch(self, epoch: int) -> None:
        a = self.a
        loss_sum, samples = self._accum_global()
        if not math.isfinite(loss_sum):
            raise ConvfxError(f"training loss became non-finite in epoch {epoch + 1}", where="finetune",
                              hint="lower the learning rate; the last good checkpoint was kept")
        if self.distributed:
            # DDP syncs buffers at the start of a forward; make them agree after the last one.
            with torch.no_grad():
                for buf in self.model.buffers():
                    dist.broadcast(buf, 0)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(samples, 1),
            "images_per_s": samples / self.seconds if self.seconds > 0 else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "step": self.global_step,
        }
        if self.val_loader is not None:
            loader, sharded = _shard_eval_loader(self.val_loader, self.rank, self.world)
            res = evaluate(self.model, loader, progress=a["progress"], distributed=sharded and self.distributed,
                           desc=f"val {epoch + 1}")
            record.update({"val_top1": res["top1"], "val_top5": res["top5"], "val_loss": res["loss"]})
        self.history.append(record)
        if self.rank == 0:
            ips = record["images_per_s"]
            msg = f"epoch {epoch + 1}/{a['epochs']}: train loss {record['train_loss']:.4f}"
            if "val_top1" in record:
                msg += (f" | val top1 {record['val_top1']:.2f}% top5 {record['val_top5']:.2f}%"
                        f" loss {record['val_loss']:.4f}")
            msg += f" | {ips:.1f} img/s" if ips else ""
            logger.info(msg + f" | lr {record['lr']:.4g}")
        self.loss_sum.zero_()
        self.samples, self.seconds = 0, 0.0
        self.save(epoch + 1, 0)
        self.epoch, self.step_in_epoch = epoch + 1, 0


def finetune(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.9,
    kd_temperature: float = 4.0,
    feature_kd: float = 0.0,
    feature_layers: Sequence[str] | None = None,
    bn_recalibrate: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    seed: int = 0,
    max_steps_per_epoch: int | None = None,
    progress: bool = True,
    log_every: int = 50,
    device: torch.device | str | None = None,
    callback: Callable[[StepInfo], bool | None] | None = None,
    dist_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place with SGD; resumable, optionally distilled and distributed.

    * Optimizer: SGD with momentum; weight decay only on tensors with ``ndim > 1``.
    * ``schedule``: ``"cosine"`` (to zero over all steps), ``"onecycle"`` (``OneCycleLR``
      with peak ``lr``) or ``"constant"``; ``warmup_steps`` of linear warm-up (for
      one-cycle: the rising phase).  Stepped after every optimizer step.
    * ``teacher``: distil from it (eval mode, no grad, moved to the student's device)
      with :func:`distillation_loss`.
    * ``feature_kd``: with a teacher, add ``feature_kd`` times
      :func:`feature_distillation_loss` over the outputs of ``feature_layers`` (module
      names both models share; default: every shared BatchNorm), so that each compressed
      layer is pulled back towards the teacher's activations, not only the logits.
    * ``bn_recalibrate``: re-estimate BN statistics from that many batches first
      (:func:`recalibrate_bn`; skipped when resuming).
    * ``checkpoint_dir``: write ``last.pt`` atomically every ``checkpoint_every`` global
      steps (0: never mid-epoch) and at each epoch end, and with ``resume`` continue
      from it exactly (see the module docstring for the guarantees).
    * ``callback(StepInfo)`` runs after each step (after any checkpoint of that step);
      returning True saves a checkpoint and stops (at the last step of an epoch: after
      that epoch's validation and checkpoint); under DDP all ranks must agree.
    * Under ``torchrun`` (WORLD_SIZE > 1): initialises the process group if needed (left
      up for later :func:`evaluate` calls; see :func:`cleanup_distributed`), wraps the
      model in DDP, shards the data, all-reduces losses and validation counts; only rank
      0 writes checkpoints and logs.  ``train_loader.batch_size`` is per rank.

    Returns ``{"history": [per-epoch dicts: epoch, train_loss, images_per_s, lr, step,
    val_top1/val_top5/val_loss], "step": final global step, "resumed_from": global step
    or None, "stopped_early": bool, "checkpoint": path or None}``.
    """
    _check_args(epochs=epochs, lr=lr, schedule=schedule, warmup_steps=warmup_steps, kd_alpha=kd_alpha,
                kd_temperature=kd_temperature, feature_kd=feature_kd, has_teacher=teacher is not None,
                bn_recalibrate=bn_recalibrate,
                checkpoint_every=checkpoint_every, max_steps_per_epoch=max_steps_per_epoch,
                nesterov=nesterov, momentum=momentum, weight_decay=weight_decay)
    args = dict(
        epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
        schedule=schedule, warmup_steps=warmup_steps, teacher=teacher, kd_alpha=kd_alpha,
        kd_temperature=kd_temperature, feature_kd=feature_kd, feature_layers=feature_layers,
        bn_recalibrate=bn_recalibrate, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, resume=resume, seed=seed,
        max_steps_per_epoch=max_steps_per_epoch, progress=progress, log_every=log_every,
        device=device, callback=callback, dist_timeout_s=dist_timeout_s,
    )
    # finetune() puts the student in train mode and the teacher in eval mode; afterwards
    # both get back the exact per-module modes they came with.
    modes = _capture_modes(_unwrap(model))
    if teacher is not None:
        modes.update(_capture_modes(teacher))
    run = _Run(model, train_loader, val_loader, args)
    stopped = False
    try:
        run.try_resume()
        if run.epoch >= epochs and run.rank == 0:
            logger.info("checkpoint %s is already complete; nothing to do", run.ckpt_path)
        run.run()
    except _Stopped:
        stopped = True
    except Exception as exc:
        if run.distributed:
            logger.error(
                "rank %d failed in epoch %d after step %d (global step %d): %s. "
                "Last checkpoint: %s (global step %s)",
                run.rank, run.epoch + 1, run.step_in_epoch, run.global_step, exc, run.ckpt_path,
                run.last_saved_step,
            )
            if not isinstance(exc, ConvfxError) and _is_comm_failure(exc):
                raise ConvfxError(
                    "a collective operation failed: another rank has probably crashed or timed out "
                    f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})",
                    where=f"rank {run.rank}",
                    hint=f"fix the failing rank and re-launch to resume from {run.ckpt_path}"
                    if run.ckpt_path else "pass checkpoint_dir= to make runs resumable",
                ) from exc
        raise
    finally:
        if run.tap is not None:
            run.tap.close()
        _restore_modes(modes)
    return {
        "history": run.history,
        "step": run.global_step,
        "resumed_from": run.resumed_from,
        "stopped_early": stopped,
        "checkpoint": str(run.ckpt_path) if run.ckpt_path is not None else None,
    }


def _check_args(**kw: Any) -> None:
    def bad(msg: str) -> ConvfxError:
        return ConvfxError(msg, where="finetune")

    if not isinstance(kw["epochs"], int) or kw["epochs"] < 1:
        raise bad(f"epochs must be a positive int, got {kw['epochs']!r}")
    if not kw["lr"] > 0:
        raise bad(f"lr must be positive, got {kw['lr']!r}")
    if kw["schedule"] not in _SCHEDULES:
        raise bad(f"schedule must be one of {_SCHEDULES}, got {kw['schedule']!r}")
    if kw["warmup_steps"] < 0:
        raise bad("warmup_steps must be >= 0")
    if not 0.0 <= kw["kd_alpha"] <= 1.0:
        raise bad(f"kd_alpha must be in [0, 1], got {kw['kd_alpha']!r}")
    if not kw["kd_temperature"] > 0:
        raise bad(f"kd_temperature must be positive, got {kw['kd_temperature']!r}")
    if not (isinstance(kw["feature_kd"], (int, float)) and math.isfinite(kw["feature_kd"])
            and kw["feature_kd"] >= 0):
        raise bad(f"feature_kd must be a finite number >= 0, got {kw['feature_kd']!r}")
    if kw["feature_kd"] > 0 and not kw["has_teacher"]:
        raise bad("feature_kd > 0 needs a teacher to match")
    if kw["bn_recalibrate"] < 0:
        raise bad("bn_recalibrate must be >= 0")
    if kw["checkpoint_every"] < 0:
        raise bad("checkpoint_every must be >= 0")
    if kw["max_steps_per_epoch"] is not None and kw["max_steps_per_epoch"] < 1:
        raise bad("max_steps_per_epoch must be >= 1 or None")
    if kw["nesterov"] and not kw["momentum"] > 0:
        raise bad("nesterov=True needs a positive momentum")
    if kw["momentum"] < 0 or kw["weight_decay"] < 0:
        raise bad("momentum and weight_decay must be >= 0")

