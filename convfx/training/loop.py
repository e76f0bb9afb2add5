"""``finetune``: the epoch/step loop, with checkpoints, resume, distillation and DDP.

See :mod:`convfx.train` for the reproducibility contract this loop keeps.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from passes.errors import ConvfxError

from ..checkpoint import load_checkpoint, load_state_dict_strict
from .bn import recalibrate_bn
from .common import capture_modes, logger, progress_disabled, restore_modes, split_batch, unwrap
from .distill import FeatureTap, distillation_loss, feature_distillation_loss, resolve_feature_layers
from .distributed import all_reduce_sum, distributed_info, init_distributed, is_comm_failure, training_device
from .evaluation import evaluate
from .guard import UNLOGGED_POLL_EVERY, Divergence, DivergenceGuard, GoodState
from .optim import build_optimizer, fast_forward
from .options import FinetuneOptions, StepInfo
from .resume import ResumableCheckpoint, first_unseen_step
from .rng import mix_seed, rng_state, seed_all, set_rng_state
from .sampler import (
    DeterministicBatchSampler,
    LoaderSpec,
    SeededSamples,
    loader_spec,
    rebuild_loader,
    shard_eval_loader,
)

__all__ = ["finetune"]


class _Stopped(Exception):
    """Internal: a callback asked to stop after a checkpoint."""


class _Run:
    """State and steps of one ``finetune`` call."""

    def __init__(self, model: nn.Module, train_loader: DataLoader, val_loader: Iterable[Any] | None,
                 opts: FinetuneOptions) -> None:
        self.opts = opts
        self.model = model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.spec = loader_spec(train_loader, "finetune: train_loader")
        self.dataset = train_loader.dataset
        self.num_samples = len(self.dataset)  # type: ignore[arg-type]

        init_distributed(timeout_s=opts.dist_timeout_s)  # left up for later evaluate() calls
        info = distributed_info()
        self.rank, self.world = info.rank, info.world_size
        self.distributed = info.initialized and self.world > 1
        self.device = training_device(opts.device, model, self.distributed)
        model.to(self.device)
        self.teacher: nn.Module | None = opts.teacher
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.feature_layers: list[str] = []
        if opts.feature_kd > 0 and self.teacher is not None:  # FinetuneOptions refuses one without the other
            self.feature_layers = resolve_feature_layers(model, self.teacher, opts.feature_layers)
        self.steps_per_epoch, self.total_steps = _count_steps(opts, self.spec, self.num_samples, self.world)
        self.optimizer, self.scheduler = build_optimizer(model, opts, self.total_steps)
        self.train_model: nn.Module = model
        if self.distributed:
            self.train_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        config = opts.fingerprint_config(self.spec, self.num_samples, self.feature_layers)
        self.checkpoint = ResumableCheckpoint(opts.checkpoint_dir, config, rank=self.rank, world=self.world,
                                              distributed=self.distributed)

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
        # Set by run(): the per-step divergence check, and the state a diverged run restores.
        self.guard: DivergenceGuard | None = None
        self.good: GoodState | None = None
        self.tap: FeatureTap | None = None
        if self.feature_layers and self.teacher is not None:  # last: nothing may raise after the hooks go in
            self.tap = FeatureTap(model, self.teacher, self.feature_layers)

    @property
    def ckpt_path(self) -> Path | None:
        """Where this run checkpoints (None: nowhere)."""
        return self.checkpoint.path

    # -------------------------------------------------------------- checkpoints

    def _accum_global(self) -> tuple[float, int]:
        """This epoch's loss sum and sample count over all ranks (collective under DDP)."""
        loss_sum, samples = float(self.loss_sum), self.samples
        if self.distributed:
            loss_sum, s = all_reduce_sum([loss_sum, float(samples)])
            samples = int(round(s))
        return loss_sum, samples

    def save(self, epoch: int, step_in_epoch: int) -> bool:
        """Write last.pt (rank 0). Collective under DDP: every rank must call it."""
        if self.ckpt_path is None:
            return False
        self.check_divergence()  # never write a diverged state (the device is waited for here anyway)
        loss_sum, samples = self._accum_global()
        if self.rank == 0:
            self.checkpoint.write({
                "steps_per_epoch": self.steps_per_epoch,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": self.global_step,
                "complete": epoch >= self.opts.epochs,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "epoch_accum": {"loss_sum": loss_sum, "samples": samples, "seconds": self.seconds},
                "history": self.history,
            })
        self.last_saved_step = self.global_step
        return True

    def try_resume(self) -> None:
        """Continue from the checkpoint, if there is one and ``resume`` allows it."""
        if not self.checkpoint.find(self.opts.resume):
            return
        ckpt = self.checkpoint.load(self.model, self.optimizer)
        epoch, step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        if ckpt["world_size"] == self.world and ckpt["steps_per_epoch"] == self.steps_per_epoch:
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.global_step = int(ckpt["global_step"])
        else:
            step = self._rejoin(ckpt, epoch, step)
        self.epoch, self.step_in_epoch = epoch, step
        set_rng_state(ckpt["rng"])
        self.history = list(ckpt["history"])
        acc = ckpt["epoch_accum"]
        if self.rank == 0 and step > 0:
            self.loss_sum.fill_(acc["loss_sum"])
            self.samples = int(acc["samples"])
        self.seconds = float(acc["seconds"]) if step > 0 else 0.0
        self.resumed_from = self.global_step
        self.last_saved_step = self.global_step
        if self.rank == 0:
            logger.info("resumed from %s at epoch %d, step %d (global step %d)",
                        self.ckpt_path, epoch, step, self.global_step)

    def _rejoin(self, ckpt: dict[str, Any], epoch: int, step: int) -> int:
        """After a world-size change: the step to continue at, with the schedule fast-forwarded to it."""
        old_world, batch = int(ckpt["world_size"]), self.spec.batch_size
        new_step = first_unseen_step(step, old_world, batch_size=batch, world=self.world,
                                     num_samples=self.num_samples, steps_per_epoch=self.steps_per_epoch)
        if epoch >= self.opts.epochs:
            new_step = 0
        logger.warning(
            "world size changed (%d -> %d): resuming epoch %d at sample %d (step %d); the "
            "result will not be bit-identical to an uninterrupted run",
            ckpt["world_size"], self.world, epoch, new_step * batch * self.world, new_step,
        )
        self.global_step = min(epoch * self.steps_per_epoch + new_step, self.total_steps)
        fast_forward(self.scheduler, self.global_step)
        return new_step

    # -------------------------------------------------------------------- steps

    def epoch_loader(self, epoch: int, start_step: int, *, rank: int, world: int,
                     max_steps: int | None) -> DataLoader:
        """This rank's batches of ``epoch`` from ``start_step`` on, each sample seeded by its position."""
        seed, spec = self.opts.seed, self.spec
        sampler = DeterministicBatchSampler(
            self.num_samples, spec.batch_size, seed=seed, epoch=epoch,
            shuffle=spec.shuffle, drop_last=spec.drop_last, rank=rank, world_size=world,
            start_step=start_step, max_steps=max_steps, with_sample_seeds=True,
        )
        return rebuild_loader(
            self.train_loader, SeededSamples(self.dataset), batch_sampler=sampler,
            seed=mix_seed(seed, "workers", epoch, rank),
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, or the distillation loss (plus the feature term) with a teacher."""
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
        opts = self.opts
        loss = distillation_loss(out, t_out, y, alpha=opts.kd_alpha, temperature=opts.kd_temperature)
        if self.tap is not None:
            loss = loss + opts.feature_kd * feature_distillation_loss(*self.tap.take())
        return loss

    def run(self) -> None:
        """BN re-estimation (fresh runs only), then the epochs from where the run stands."""
        opts = self.opts
        if self.epoch >= opts.epochs:
            return
        # Reading the guard waits for the device: free on the CPU, so after every step;
        # elsewhere only where the loop waits anyway (see .guard).
        poll_every = 1 if self.device.type == "cpu" else (opts.log_every or UNLOGGED_POLL_EVERY)
        self.guard = DivergenceGuard(self.model, self.device, global_step=self.global_step,
                                     poll_every=poll_every, distributed=self.distributed)
        if self.resumed_from is None:
            self.good = GoodState(self.model, "before fine-tuning started", self.global_step)
        else:
            self.good = GoodState(self.model, f"when the run resumed (global step {self.global_step})",
                                  self.global_step)
        if self.resumed_from is None and opts.bn_recalibrate > 0:
            # Same batches on every rank, so all ranks end with identical statistics.
            recal = self.epoch_loader(-1, 0, rank=0, world=1, max_steps=opts.bn_recalibrate)
            recalibrate_bn(self.model, recal, opts.bn_recalibrate)
        start_epoch, start_step = self.epoch, self.step_in_epoch
        for epoch in range(start_epoch, opts.epochs):
            if epoch != start_epoch:
                self.good = GoodState(self.model, f"at the start of epoch {epoch + 1} (global step "
                                      f"{self.global_step})", self.global_step)
            first = start_step if epoch == start_epoch else 0
            self.epoch, self.step_in_epoch = epoch, first
            self.model.train()
            if self.teacher is not None:
                self.teacher.eval()
            if first < self.steps_per_epoch:
                self.train_epoch(epoch, first)
            self.end_epoch(epoch)
            if self.stop_requested:
                raise _Stopped

    def train_epoch(self, epoch: int, first: int) -> None:
        """The steps of ``epoch`` from step ``first`` on."""
        opts = self.opts
        loader = self.epoch_loader(epoch, first, rank=self.rank, world=self.world,
                                   max_steps=opts.max_steps_per_epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{opts.epochs}",
                   disable=progress_disabled(opts.progress, self.rank), leave=False)
        t0 = time.perf_counter()
        try:
            for i, batch in enumerate(loader, start=first):
                self.step(epoch, i, batch, bar)
        finally:
            bar.close()
            self.seconds += time.perf_counter() - t0

    def step(self, epoch: int, i: int, batch: Any, bar: Any) -> None:
        """One optimizer step on ``batch``, the ``i``-th of ``epoch``, and what follows it."""
        opts = self.opts
        x, y = split_batch(batch, "finetune")
        if y is None:
            raise ConvfxError("training needs (inputs, targets) batches", where="finetune")
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        # Forward-pass randomness (dropout...) as a function of the step alone.
        seed_all(mix_seed(opts.seed, "step", epoch, i, self.rank))
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
        assert self.guard is not None
        self.guard.observe(loss)
        if self.guard.due(self.global_step):
            self.check_divergence()
        bar.update(1)
        if opts.log_every and self.global_step % opts.log_every == 0:
            self._log_step(epoch, done, loss, bar)
        saved = False
        every = opts.checkpoint_every
        if every and self.global_step % every == 0 and done < self.steps_per_epoch:
            saved = self.save(epoch, done)
        if opts.callback is not None:
            self._call_back(opts.callback, epoch, done, loss, saved)

    def _log_step(self, epoch: int, done: int, loss: torch.Tensor, bar: Any) -> None:
        """Report the loss (the divergence guard has been read at this step: it is finite)."""
        # Only here (and at checkpoints) do we wait for the device to read the loss.
        value = float(loss)
        bar.set_postfix(loss=f"{value:.4f}")
        if self.rank == 0:
            logger.info(
                "epoch %d step %d/%d: loss %.4f (epoch mean %.4f), lr %.4g",
                epoch + 1, done, self.steps_per_epoch, value,
                float(self.loss_sum) / max(self.samples, 1), self.optimizer.param_groups[0]["lr"],
            )

    def _call_back(self, callback: Callable[[StepInfo], bool | None], epoch: int, done: int,
                   loss: torch.Tensor, saved: bool) -> None:
        """Run the user's callback; True stops now, or after the epoch's end on its last step."""
        info = StepInfo(epoch, done, self.steps_per_epoch, self.global_step, loss.detach(),
                        self.optimizer.param_groups[0]["lr"], self.rank, saved)
        if callback(info) is not True:
            return
        if done < self.steps_per_epoch:
            if not saved:
                self.save(epoch, done)
            raise _Stopped
        self.stop_requested = True  # after this epoch's validation and checkpoint

    def end_epoch(self, epoch: int) -> None:
        """Sync buffers, validate, log and checkpoint the finished ``epoch``."""
        self.check_divergence()
        loss_sum, samples = self._accum_global()
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
            record.update(self._validate(epoch))
        self.history.append(record)
        if self.rank == 0:
            logger.info(_epoch_message(record, self.opts.epochs))
        self.loss_sum.zero_()
        self.samples, self.seconds = 0, 0.0
        self.save(epoch + 1, 0)
        self.epoch, self.step_in_epoch = epoch + 1, 0

    # --------------------------------------------------------------- divergence

    def check_divergence(self) -> None:
        """Read the guard; on a non-finite loss or weights restore good weights and raise.

        Waits for the device, and under DDP is a collective: every rank calls it at the
        same global step (the guard's cadence, checkpoints, epoch ends).
        """
        if self.guard is None:
            return
        diverged = self.guard.poll()
        if diverged is not None:
            self._diverged(diverged)

    def _diverged(self, d: Divergence) -> NoReturn:
        """Put good weights and buffers back into the caller's model, then say what happened."""
        source = self._restore_good_state()
        epoch, in_epoch = divmod(d.global_step - 1, self.steps_per_epoch)
        what = ("the loss was NaN or infinite" if d.loss
                else "the loss was finite but the step left parameters or buffers NaN or infinite")
        hint = f"lower the learning rate (lr={self.opts.lr:g})"
        if self.opts.warmup_steps == 0:
            hint += " or add warmup_steps"
        raise ConvfxError(
            f"training diverged at epoch {epoch + 1}, step {in_epoch + 1} (global step {d.global_step}): "
            f"{what}; the model's weights and buffers were restored from {source}",
            where="finetune", hint=hint,
        )

    def _restore_good_state(self) -> str:
        """Restore the newest good state: this run's last checkpoint if newer, else the in-memory copy."""
        good = self.good
        assert good is not None
        path, saved = self.ckpt_path, self.last_saved_step
        if path is not None and saved is not None and saved > good.global_step:
            try:
                ckpt = load_checkpoint(path, map_location="cpu")
                load_state_dict_strict(self.model, ckpt["model"], where=str(path))
                return f"the checkpoint {path} (global step {saved})"
            except (ConvfxError, KeyError) as exc:
                logger.warning("cannot restore the weights from %s (%s); using the in-memory copy instead",
                               path, exc)
        good.restore(self.model)
        return f"the in-memory copy taken {good.label}"

    def _validate(self, epoch: int) -> dict[str, float]:
        """The validation entries of the epoch's history record (each rank evaluates its shard)."""
        assert self.val_loader is not None
        loader, sharded = shard_eval_loader(self.val_loader, self.rank, self.world)
        res = evaluate(self.model, loader, progress=self.opts.progress, distributed=sharded and self.distributed,
                       desc=f"val {epoch + 1}")
        return {"val_top1": res["top1"], "val_top5": res["top5"], "val_loss": res["loss"]}

    def result(self, stopped: bool) -> dict[str, Any]:
        """What ``finetune`` returns."""
        return {
            "history": self.history,
            "step": self.global_step,
            "resumed_from": self.resumed_from,
            "stopped_early": stopped,
            "checkpoint": str(self.ckpt_path) if self.ckpt_path is not None else None,
        }


def _count_steps(opts: FinetuneOptions, spec: LoaderSpec, num_samples: int, world: int) -> tuple[int, int]:
    """Steps per epoch and in all; the argument rules that need the data and the world size."""
    per_epoch = DeterministicBatchSampler.steps_per_epoch(
        num_samples, spec.batch_size, world, spec.drop_last, opts.max_steps_per_epoch
    )
    if per_epoch == 0:
        raise ConvfxError(
            f"an epoch has no steps: {num_samples} samples, batch size {spec.batch_size} "
            f"x {world} rank(s), drop_last={spec.drop_last}",
            where="finetune",
        )
    total = per_epoch * opts.epochs
    if opts.schedule == "onecycle" and opts.warmup_steps >= total:
        raise ConvfxError(
            f"warmup_steps ({opts.warmup_steps}) must be below the {total} total steps",
            where="finetune",
        )
    return per_epoch, total


def _epoch_message(record: dict[str, Any], epochs: int) -> str:
    """The log line of one finished epoch (its ``history`` record)."""
    ips = record["images_per_s"]
    msg = f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}"
    if "val_top1" in record:
        msg += (f" | val top1 {record['val_top1']:.2f}% top5 {record['val_top5']:.2f}%"
                f" loss {record['val_loss']:.4f}")
    msg += f" | {ips:.1f} img/s" if ips else ""
    return msg + f" | lr {record['lr']:.4g}"


def _explain_failure(run: _Run, exc: Exception) -> None:
    """Under DDP: log where this rank failed, and turn a failed collective into a ConvfxError."""
    logger.error(
        "rank %d failed in epoch %d after step %d (global step %d): %s. "
        "Last checkpoint: %s (global step %s)",
        run.rank, run.epoch + 1, run.step_in_epoch, run.global_step, exc, run.ckpt_path,
        run.last_saved_step,
    )
    if isinstance(exc, ConvfxError) or not is_comm_failure(exc):
        return
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise ConvfxError(
        f"a collective operation failed: another rank has probably crashed or timed out ({first_line})",
        where=f"rank {run.rank}",
        hint=f"fix the failing rank and re-launch to resume from {run.ckpt_path}"
        if run.ckpt_path else "pass checkpoint_dir= to make runs resumable",
    ) from exc


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
    * Divergence: after every step the loss and the weights (parameters and floating-point
      buffers) are checked for NaN/inf without a device sync (:mod:`.guard`; read after
      every step on the CPU, elsewhere every ``log_every`` steps and before each
      checkpoint and epoch end).  A diverged run puts back the weights and buffers of
      this run's last checkpoint when that is newer than the failed epoch's start, else
      of an in-memory CPU copy taken at that start (for the first epoch: before anything,
      BN re-estimation included), and raises :class:`ConvfxError` naming the step and
      what was restored.  A checkpoint is never written from a diverged state.
    * Under ``torchrun`` (WORLD_SIZE > 1): initialises the process group if needed (left
      up for later :func:`evaluate` calls; see :func:`cleanup_distributed`), wraps the
      model in DDP, shards the data, all-reduces losses and validation counts; only rank
      0 writes checkpoints and logs.  ``train_loader.batch_size`` is per rank.

    Returns ``{"history": [per-epoch dicts: epoch, train_loss, images_per_s, lr, step,
    val_top1/val_top5/val_loss], "step": final global step, "resumed_from": global step
    or None, "stopped_early": bool, "checkpoint": path or None}``.
    """
    opts = FinetuneOptions(
        epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
        schedule=schedule, warmup_steps=warmup_steps, teacher=teacher, kd_alpha=kd_alpha,
        kd_temperature=kd_temperature, feature_kd=feature_kd, feature_layers=feature_layers,
        bn_recalibrate=bn_recalibrate, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        resume=resume, seed=seed, max_steps_per_epoch=max_steps_per_epoch, progress=progress,
        log_every=log_every, device=device, callback=callback, dist_timeout_s=dist_timeout_s,
    )
    # finetune() puts the student in train mode and the teacher in eval mode; afterwards
    # both get back the exact per-module modes they came with.
    modes = capture_modes(unwrap(model))
    if teacher is not None:
        modes.update(capture_modes(teacher))
    run = _Run(model, train_loader, val_loader, opts)
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
            _explain_failure(run, exc)
        raise
    finally:
        if run.tap is not None:
            run.tap.close()
        restore_modes(modes)
    return run.result(stopped)
