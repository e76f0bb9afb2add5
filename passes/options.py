"""Every option of ``compress`` in one validated, frozen dataclass.

Why one object: ``compress``, the CLI and the ``torch.compile`` backend all build it, so
each argument rule (and each rule between arguments) is written once and checked before
any tracing or data loading starts. The pipeline (:mod:`passes.pipeline`) reads it.

>>> CompressOptions(method="id")
Traceback (most recent call last):
...
ValueError: method: 'id' narrows hidden channels to a FLOP budget; pass flops_target=... and calibration=...
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .calibrate import SHRINK
from .factors import METHODS
from .latency import BACKENDS
from .ranks import COMPRESS_METHODS, RankSpec, validate_rank_spec

__all__ = ["CompressOptions", "FilterFn", "default_filter"]

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Select every convolution; Linears only when a user's ``filter_fn`` asks.

    A functional ``conv2d`` is owned by whatever module holds its weight, which need not
    be an ``nn.Conv2d``; the default selects those too.
    """
    return not isinstance(module, nn.Linear)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class CompressOptions:
    """What to compress and how; see :func:`convfx.compress` for each field's meaning.

    Fields beyond ``compress``'s keywords are switches for ablations
    (``skip_targets``); they keep their defaults unless a study turns them off.
    """

    method: str = "tucker"
    rank: RankSpec = "vbmf"
    filter_fn: FilterFn | None = None
    inplace: bool = False
    calibration: Any = None
    flops_target: float | None = None
    rank_multiple: int = 1
    calibration_batches: int | None = None
    calibration_shrink: float = SHRINK
    refine_steps: int = 0
    progress: bool = True
    latency_target: float | None = None
    latency_backend: str = "inductor"
    #: Builds what measures time, from (original model, example inputs, backend); default
    #: :class:`passes.speed.MeasuredMeter`. Tests inject deterministic meters here.
    latency_meter: Callable[..., Any] | None = None
    distill_steps: int = 0
    distill_augment: Any = "default"
    #: Further :class:`passes.recover.DistillConfig` fields (``lr``, ``batch_size``, ``bn``, ...).
    distill_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Fraction of the calibration images kept out of distillation to choose its weights on.
    distill_holdout: float = 0.2
    #: method="id": fit a chain that joins a residual add to the original block output
    #: (:func:`passes.interp.skip_join`) rather than to its last conv's own output.
    skip_targets: bool = True

    def __post_init__(self) -> None:
        method, target = self.method, self.flops_target
        if method not in COMPRESS_METHODS:
            raise ValueError(f"method: expected one of {COMPRESS_METHODS}, got {method!r}")
        self._check_latency()
        budgeted = target is not None or self.latency_target is not None
        if method == "id" and not budgeted:
            raise ValueError("method: 'id' narrows hidden channels to a FLOP budget; pass flops_target=... "
                             "and calibration=...")
        if method == "auto" and not budgeted:
            raise ValueError("method: 'auto' chooses each layer's structure inside the flops_target allocation; "
                             "pass flops_target=... or one of " + ", ".join(METHODS))
        validate_rank_spec(self.rank)
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError(f"filter_fn: expected a callable (module, fqn) -> bool, "
                             f"got {type(self.filter_fn).__name__}")
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
                raise ValueError(f"flops_target: expected a fraction in (0, 1], got {target!r}")
            if self.rank != "vbmf":
                raise ValueError("rank: pass either rank or flops_target, not both (flops_target allocates ranks)")
        if not _is_int(self.rank_multiple) or self.rank_multiple < 1:
            raise ValueError(f"rank_multiple: expected a positive int, got {self.rank_multiple!r}")
        if not _is_int(self.refine_steps) or self.refine_steps < 0:
            raise ValueError(f"refine_steps: expected an int >= 0, got {self.refine_steps!r}")
        if self.refine_steps and method != "id":
            raise ValueError(f"refine_steps: only method='id' refines by gradient steps (method={method!r})")
        shrink = self.calibration_shrink
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not math.isfinite(shrink) or shrink < 0:
            raise ValueError(f"calibration_shrink: expected a finite number >= 0, got {shrink!r}")
        if isinstance(self.calibration, torch.Tensor):
            raise ValueError("calibration: pass an iterable of batches (a DataLoader, a list or a generator), "
                             "not a single tensor; wrap it as [tensor]")
        limit = self.calibration_batches
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise ValueError(f"calibration_batches: expected a positive int, got {limit!r}")
        self._check_distill()
        if method == "id":
            if self.calibration is None:
                raise ValueError("calibration: method='id' refits each chain's last conv on data; "
                                 "pass calibration=...")
            if self.rank_multiple > 1:
                raise ValueError("rank_multiple: not supported with method='id' (widths are allocated per channel)")

    def _check_distill(self) -> None:
        from .recover import DistillConfig

        unknown = sorted(set(self.distill_settings) - {f.name for f in dataclasses.fields(DistillConfig)}
                         | ({"steps", "augment"} & set(self.distill_settings)))
        if unknown:
            raise ValueError(f"distill_settings: unknown or misplaced key(s) {unknown} (steps and augment are "
                             "distill_steps and distill_augment)")
        self.distill_config  # DistillConfig checks each value and names the argument
        h = self.distill_holdout
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 1:
            raise ValueError(f"distill_holdout: expected a fraction in [0, 1), got {h!r}")
        if self.distill_steps and self.calibration is None:
            raise ValueError("distill_steps: distillation trains on unlabeled inputs; pass calibration=...")

    @property
    def distill_config(self) -> Any:
        """The recovery stage's settings (:class:`passes.recover.DistillConfig`)."""
        from .recover import DistillConfig

        return DistillConfig(steps=self.distill_steps, augment=self.distill_augment, **dict(self.distill_settings))

    def _check_latency(self) -> None:
        target = self.latency_target
        if self.latency_backend not in BACKENDS:
            raise ValueError(f"latency_backend: expected one of {BACKENDS}, got {self.latency_backend!r}")
        if self.latency_meter is not None and not callable(self.latency_meter):
            raise ValueError(f"latency_meter: expected a callable (model, inputs, backend) -> meter, "
                             f"got {type(self.latency_meter).__name__}")
        if target is None:
            return
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
            raise ValueError(f"latency_target: expected a fraction in (0, 1] of the original's time, got {target!r}")
        if self.flops_target is not None:
            raise ValueError("latency_target: pass either flops_target or latency_target, not both")
        if self.rank != "vbmf":
            raise ValueError("rank: pass either rank or latency_target, not both (latency_target allocates ranks)")

    @property
    def select(self) -> FilterFn:
        """The layer selector in force."""
        return self.filter_fn or default_filter

    @property
    def rank_source(self) -> str:
        """Which registered rank source plans the layers (:data:`passes.pipeline.RANK_SOURCES`)."""
        if self.method == "id":
            return "id"
        return "budget" if self.flops_target is not None or self.latency_target is not None else "explicit"

    @property
    def objective(self) -> str:
        """What a budget allocation spends (:data:`passes.budget.COSTS`)."""
        return "latency" if self.latency_target is not None else "macs"

    @property
    def rank_label(self) -> str:
        """How the ranks were asked for, as the report states it."""
        if self.flops_target is not None:
            return f"flops_target={self.flops_target}"
        if self.latency_target is not None:
            return f"latency_target={self.latency_target} ({self.latency_backend})"
        return str(self.rank) if not isinstance(self.rank, Mapping) else f"dict[{len(self.rank)}]"

    def replace(self, **changes: Any) -> "CompressOptions":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
