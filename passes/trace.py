"""Symbolic tracing that keeps convolutions visible to the rewrite pass.

Plain conv modules (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and subclasses that
do not override ``forward``) stay ``call_module`` leaves, so that the rewrite can swap them as a unit. Subclasses that
override ``forward`` (for example a "static same padding" conv that pads and then calls
``F.conv2d`` on its own weight) are traced *into*: swapping them for plain convs would
silently drop their extra logic. Their convolution then appears as a ``call_function``
``conv2d`` node whose weight comes from a ``get_attr``.

Modules whose ``forward`` cannot be traced (data-dependent control flow) are retried as
leaves; convs inside them are reported as skipped rather than failing the whole model.
When the root's own ``forward`` cannot be traced, :func:`trace` raises a
:class:`ConvfxError` of kind :data:`UNTRACEABLE_ROOT`; :mod:`passes.parts` then compresses
the model's largest traceable submodules instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch.fx as fx
from torch import nn

from .errors import ConvfxError

__all__ = ["ConvfxTracer", "TraceResult", "UNTRACEABLE_ROOT", "first_line", "trace", "is_plain_conv"]

log = logging.getLogger(__name__)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PLAIN_FORWARDS = frozenset(t.forward for t in _CONV_TYPES)

#: :attr:`ConvfxError.kind` of a model whose root ``forward`` cannot be traced (no leaf
#: fallback can help), so that callers can fall back to compressing its parts.
UNTRACEABLE_ROOT = "untraceable_root"


def is_plain_conv(module: nn.Module) -> bool:
    """True for a conv whose behaviour is fully described by its hyperparameters."""
    return isinstance(module, _CONV_TYPES) and type(module).forward in _PLAIN_FORWARDS


class ConvfxTracer(fx.Tracer):
    """fx Tracer with convfx's leaf policy and a record of the module being traced.

    ``extra_leaves`` holds qualified names forced to be leaves (untraceable modules).
    ``failed_in`` records the innermost module whose tracing raised, to name it.
    """

    def __init__(self, extra_leaves: set[str] | None = None) -> None:
        super().__init__()
        self.extra_leaves: set[str] = set(extra_leaves or ())
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.extra_leaves:
            return True
        if isinstance(m, _CONV_TYPES):
            return is_plain_conv(m)
        # Already-factorized containers are traced into (their factors are leaves).
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost module first
                self.failed_in = self.path_of_module(m)
            raise


@dataclass
class TraceResult:
    """A traced GraphModule plus what tracing had to give up on."""

    gm: fx.GraphModule
    leaf_fallbacks: dict[str, str] = field(default_factory=dict)  # qualname -> reason


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``: how reports name a failure in one line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def trace(model: nn.Module, *, max_fallbacks: int = 32, leaves: Iterable[str] = (), strict: bool = False,
          quiet: bool = False) -> TraceResult:
    """Trace ``model`` with :class:`ConvfxTracer`, demoting untraceable submodules to leaves.

    ``leaves`` names submodules that stay leaves whatever they are. ``strict`` demotes
    nothing: the first failure raises (what :mod:`passes.parts` needs to decide whether a
    submodule traces as it is). ``quiet`` logs demotions at debug level (a second trace of
    the same model, e.g. a check before the pipeline's own trace).

    Raises :class:`ConvfxError` (kind :data:`UNTRACEABLE_ROOT`) when the root module itself
    cannot be traced. Any exception raised while the model's code runs on proxies counts as
    a failure to trace: it is the model's code that cannot run symbolically.

    >>> res = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> [n.op for n in res.gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    forced = set(leaves)
    fallbacks: dict[str, str] = {}
    for _ in range(max_fallbacks + 1):
        tracer = ConvfxTracer(forced | set(fallbacks))
        try:
            graph = tracer.trace(model)
        except Exception as err:  # noqa: BLE001 - re-raised with context below
            culprit = tracer.failed_in or ""
            reason = first_line(err)
            if strict or not culprit or culprit in fallbacks:
                raise ConvfxError(
                    f"cannot be traced by torch.fx ({reason})",
                    where=culprit or type(model).__name__,
                    hint="data-dependent control flow must live in a submodule (convfx then treats "
                    "it as a leaf and leaves its convs alone), or compress the traceable part and "
                    "exclude the rest with filter_fn",
                    kind=UNTRACEABLE_ROOT if not culprit or culprit in fallbacks else None,
                ) from err
            (log.debug if quiet else log.warning)(
                "module %r cannot be traced (%s); treating it as a leaf, its convs will not be "
                "factorized", culprit, reason,
            )
            fallbacks[culprit] = reason
            continue
        name = model.__class__.__name__
        gm = fx.GraphModule(tracer.root, graph, name)
        return TraceResult(gm=gm, leaf_fallbacks=fallbacks)
    raise ConvfxError(f"gave up after {max_fallbacks} untraceable submodules", where=type(model).__name__)
