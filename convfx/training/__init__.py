"""The pieces of :func:`convfx.train.finetune`, one concern per module.

:mod:`convfx.train` is the public import surface; these modules are how it is built:

* :mod:`.options` -- :class:`~.options.FinetuneOptions`, every argument rule in one place;
* :mod:`.loop` -- :func:`~.loop.finetune` and the epoch/step loop;
* :mod:`.resume` -- the resumable checkpoint (what it holds, when it may be resumed);
* :mod:`.sampler` -- deterministic per-epoch sampling and per-sample seeding;
* :mod:`.rng` -- derived seeds and the capture/restore of global RNG states;
* :mod:`.distributed` -- process-group set-up and the few collectives used;
* :mod:`.distill` -- logit and feature distillation losses;
* :mod:`.optim` -- parameter groups and LR schedules;
* :mod:`.bn` -- BatchNorm re-estimation;
* :mod:`.evaluation` -- top-1/top-5 evaluation;
* :mod:`.common` -- small model/batch helpers they share.

Nothing is re-exported here, so that importing one piece does not import them all.
"""
from __future__ import annotations

__all__: list[str] = []
