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

This module is the public import surface; the implementation lives in
:mod:`convfx.training`, one concern per module.
"""
from __future__ import annotations

from .training.bn import recalibrate_bn
from .training.distill import default_feature_layers, distillation_loss, feature_distillation_loss
from .training.distributed import DistInfo, cleanup_distributed, distributed_info, init_distributed
from .training.evaluation import evaluate
from .training.loop import finetune
from .training.optim import param_groups
from .training.options import StepInfo
from .training.resume import CHECKPOINT_NAME
from .training.sampler import DeterministicBatchSampler

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
