"""The state the pipeline's stages share (:mod:`passes.pipeline`).

Why a context object: each stage reads what earlier ones found (shapes, sites, the
calibration inputs, the traced original) and adds its own part, so stages stay small
functions of one argument that can be run, tested and replaced one at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from .batches import Batch
from .convs import Site, SkippedLayer
from .interp import Chain
from .options import CompressOptions
from .outcome import LayerReport
from .rewrite import FactorizedSite
from .trace import TraceResult

__all__ = ["Allocation", "Context"]


@dataclass
class Allocation:
    """One candidate plan of the whole model: per layer (or chain) what to do, and a label.

    Rank sources may return several (e.g. under two sensitivity models); with calibration
    data the fit keeps the one that reproduces the original best.
    """

    label: str
    plans: dict[str, Any]
    #: What the allocation's cost learnt while choosing (e.g. ``"latency"``: its measurements).
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Everything the stages share; each stage fills in its part."""

    options: CompressOptions
    model: nn.Module  # the caller's model; only ``inplace`` changes it
    inputs: tuple[Any, ...]
    assumptions: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    batches: list[Batch] = field(default_factory=list)
    src: nn.Module | None = None  # what is compressed: the model or a copy of it
    traced: TraceResult | None = None
    ref: fx.GraphModule | None = None  # the original, traced, when there is calibration data
    conv_before: int = 0
    total_before: int = 0
    params_before: int = 0
    sites: list[Site] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    chosen: list[Site] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)  # method="id"
    rows: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    done: list[FactorizedSite] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)  # method="id": narrowed chain -> hidden width
    meter: Any = None  # latency objective: what measures (passes.speed.LatencyMeter)
    latency: Any = None  # latency objective: what was measured (passes.speed.LatencyOutcome)

    @property
    def gm(self) -> fx.GraphModule:
        assert self.traced is not None, "trace first"
        return self.traced.gm
