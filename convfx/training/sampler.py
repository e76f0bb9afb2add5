"""Deterministic sampling: the order of an epoch, and the seeds of its samples, from the seed alone.

Exact resume rests on this: a resumed epoch must draw the very batches (and augmentations)
that the interrupted one would have, on any number of loader workers.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from passes.errors import ConvfxError

from .common import logger
from .rng import mix_seed, seed_all

__all__ = [
    "DeterministicBatchSampler",
    "LoaderSpec",
    "SeededSamples",
    "loader_spec",
    "rebuild_loader",
    "shard_eval_loader",
]


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
            gen = torch.Generator().manual_seed(mix_seed(self.seed, "order", self.epoch))
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
                    (i, mix_seed(self.seed, "sample", self.epoch, lo + first + j)) for j, i in enumerate(mine)
                ]
            else:
                yield mine


class SeededSamples(Dataset[Any]):
    """Seeds the loading process's RNGs per sample so augmentation is reproducible."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        seed_all(seed)
        return self.dataset[index]


class LoaderSpec(NamedTuple):
    """The sampling of a user's training loader, which each epoch's loader reproduces."""

    batch_size: int
    shuffle: bool
    drop_last: bool


def loader_spec(loader: DataLoader, where: str) -> LoaderSpec:
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
    return LoaderSpec(loader.batch_size, _shuffles(loader.sampler, where), loader.drop_last)


def _shuffles(sampler: Any, where: str) -> bool:
    """Whether a loader's sampler shuffles (the only samplers whose order we can reproduce)."""
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler._num_samples is not None:
            raise ConvfxError("RandomSampler with replacement/num_samples is not supported", where=where)
        return True
    if isinstance(sampler, SequentialSampler):
        return False
    if isinstance(sampler, DistributedSampler):
        logger.info("%s: ignoring its DistributedSampler; convfx shards the data itself", where)
        return sampler.shuffle
    raise ConvfxError(
        f"unsupported sampler {type(sampler).__name__}",
        where=where,
        hint="pass a DataLoader built with shuffle=True or shuffle=False",
    )


def rebuild_loader(
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


def shard_eval_loader(loader: Iterable[Any], rank: int, world: int) -> tuple[Iterable[Any], bool]:
    """Each rank's disjoint share of a validation loader (no padding: counts stay exact)."""
    if world == 1 or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader, False
    if loader.batch_size is None:
        return loader, False
    n = len(loader.dataset)  # type: ignore[arg-type]
    return (
        rebuild_loader(loader, loader.dataset, seed=0, sampler=list(range(rank, n, world)),
                       batch_size=loader.batch_size),
        True,
    )
