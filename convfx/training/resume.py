"""The resumable checkpoint of a fine-tuning run: what it holds and when it may be resumed.

A checkpoint resumes only a run with the same configuration (compared by a hash of
:meth:`~.options.FinetuneOptions.fingerprint_config`), so that a resumed run can be
the very run that was interrupted.  Only rank 0 writes; every rank reads.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from passes.errors import ConvfxError

from ..checkpoint import atomic_save, load_checkpoint, load_state_dict_strict, remove_partial_saves
from .common import logger
from .distributed import all_reduce_sum

__all__ = ["CHECKPOINT_NAME", "FORMAT", "ResumableCheckpoint", "first_unseen_step", "fingerprint"]

#: File name of the resumable checkpoint inside ``checkpoint_dir``.
CHECKPOINT_NAME = "last.pt"
#: The checkpoint's ``format`` entry (:mod:`convfx.serialize` recognises it too).
FORMAT = "convfx.finetune/1"


def fingerprint(config: dict[str, Any]) -> str:
    """A short hash of a run's configuration; key order does not matter."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class ResumableCheckpoint:
    """``checkpoint_dir/last.pt`` of one run (``path`` None: the run keeps no checkpoint)."""

    def __init__(self, checkpoint_dir: str | os.PathLike[str] | None, config: dict[str, Any], *,
                 rank: int, world: int, distributed: bool) -> None:
        self.path: Path | None = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
        self.config = config
        self.fingerprint = fingerprint(config)
        self.rank, self.world, self.distributed = rank, world, distributed

    def write(self, state: dict[str, Any]) -> None:
        """Atomically write ``state`` under a header that says which runs may resume it (rank 0 only)."""
        assert self.path is not None and self.rank == 0
        header = {"format": FORMAT, "fingerprint": self.fingerprint, "config": self.config,
                  "world_size": self.world}
        atomic_save({**header, **state}, self.path)

    def find(self, resume: bool) -> bool:
        """Whether there is a checkpoint to resume (collective under DDP: every rank must call it)."""
        path = self.path
        if path is None:
            return False
        if self.rank == 0:
            remove_partial_saves(path)
        found = path.exists()
        if found and not resume:
            if self.rank == 0:
                logger.warning("resume=False: %s will be overwritten by a fresh run", path)
            found = False
        if self.distributed:
            have = all_reduce_sum([1.0 if found else 0.0])[0]
            if have not in (0.0, float(self.world)):
                raise ConvfxError(
                    f"only {int(have)} of {self.world} ranks can see {path}",
                    where="finetune",
                    hint="checkpoint_dir must be on a file system shared by all ranks",
                )
        return found

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load the checkpoint into ``model`` and ``optimizer``, refusing one of another configuration."""
        assert self.path is not None
        where = str(self.path)
        ckpt = load_checkpoint(self.path, map_location="cpu")
        if ckpt.get("format") != FORMAT:
            raise ConvfxError(f"not a convfx fine-tuning checkpoint (format {ckpt.get('format')!r})", where=where)
        load_state_dict_strict(model, ckpt["model"], where=where)
        if ckpt["fingerprint"] != self.fingerprint:
            raise ConvfxError(
                f"checkpoint was written by a run with a different configuration ({self._diff(ckpt)})",
                where=where,
                hint="use another checkpoint_dir, or resume=False to start over",
            )
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ConvfxError(f"optimizer state does not fit: {exc}", where=where) from exc
        return ckpt

    def _diff(self, ckpt: dict[str, Any]) -> str:
        old, new = ckpt.get("config", {}), self.config
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def first_unseen_step(step: int, old_world: int, *, batch_size: int, world: int, num_samples: int,
                      steps_per_epoch: int) -> int:
    """The step, at the new world size, that starts at the first sample no old step consumed."""
    done = min(step * batch_size * old_world, num_samples)
    return min(done // (batch_size * world), steps_per_epoch)
