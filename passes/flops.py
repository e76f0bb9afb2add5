"""Analysis passes: shape propagation and per-node MAC counts, both read-only on the graph.

Convention (fvcore's): one multiply-add counts as one "flop", i.e. these are MACs.
Papers that say GFLOPs usually mean 2 × MACs; convfx prints both, labelled.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from .convs import CONV_FUNCTIONS
from .errors import ConvfxError
from .meta import IN_SHAPE, MACS, OUT_SHAPE

__all__ = ["propagate_shapes", "annotate_macs", "fvcore_macs", "eval_mode", "node_label"]

log = logging.getLogger(__name__)


def _import_fvcore() -> Any:
    # fvcore's import scripts a helper with torch.jit.script, which warns on new torch.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        import fvcore.nn as fvnn
        from fvcore.nn import jit_handles
    return fvnn, jit_handles


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run analysis in eval mode so BatchNorm statistics are not touched, then restore."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """A human name for a node: the module path for ``call_module``, else the node name."""
    if node.op == "call_module":
        return f"{node.target} (call_module {type(gm.get_submodule(str(node.target))).__name__})"
    if node.op in ("call_function", "call_method"):
        return f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"
    return f"{node.name} ({node.op})"


class _ShapeInterpreter(fx.Interpreter):
    """Records input/output shapes of every node; failures name the node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our message already names the node

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except ConvfxError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the node's name
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConvfxError(f"example_inputs do not fit the model: {type(err).__name__}: {msg}",
                              where=node_label(self.module, n)) from err  # type: ignore[arg-type]
        if isinstance(result, torch.Tensor):
            n.meta[OUT_SHAPE] = tuple(result.shape)
        first = n.args[0] if n.args else n.kwargs.get("input")
        if isinstance(first, fx.Node):
            shp = first.meta.get(OUT_SHAPE)
            if shp is not None:
                n.meta[IN_SHAPE] = shp
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> Any:
    """Run ``gm`` once on ``example_inputs`` (no grad, eval mode) and record shapes in meta."""
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(example_inputs) > n_ph:
        raise ConvfxError(f"example_inputs has {len(example_inputs)} tensors but the model's forward "
                          f"takes {n_ph} argument(s)", where=type(gm).__name__)
    with torch.no_grad(), eval_mode(gm):
        return _ShapeInterpreter(gm).run(*example_inputs)


def annotate_macs(gm: fx.GraphModule) -> int:
    """Write fvcore-convention MACs of each conv/linear node into ``node.meta[MACS]``.

    Uses fvcore's own per-op formulas on the recorded shapes (every conv type: 1-3 d,
    plain or transposed); returns the conv total. Requires :func:`propagate_shapes` first.
    """
    _, handles = _import_fvcore()
    conv_total = 0
    for node in gm.graph.nodes:
        w_shape: tuple[int, ...] | None = None
        is_linear = transposed = False
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, nn.modules.conv._ConvNd):
                w_shape, transposed = tuple(mod.weight.shape), bool(mod.transposed)
            elif isinstance(mod, nn.Linear):
                w_shape, is_linear = tuple(mod.weight.shape), True
        elif node.op == "call_function" and node.target in CONV_FUNCTIONS:
            transposed = CONV_FUNCTIONS[node.target][1]
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                obj: Any = gm
                for part in str(w.target).split("."):
                    obj = getattr(obj, part)
                w_shape = tuple(obj.shape)
        if w_shape is None:
            continue
        x_shape = node.meta.get(IN_SHAPE)
        y_shape = node.meta.get(OUT_SHAPE)
        if x_shape is None or y_shape is None:
            continue
        if is_linear:
            macs = int(torch.Size(x_shape).numel() * w_shape[0])
        else:
            macs = int(handles.conv_flop_count(list(x_shape), list(w_shape), list(y_shape), transposed))
            conv_total += macs
        node.meta[MACS] = macs
    return conv_total


def fvcore_macs(model: nn.Module, example_inputs: tuple[Any, ...]) -> tuple[int, int]:
    """(conv MACs, total MACs) of ``model`` counted by fvcore's ``FlopCountAnalysis``."""
    fvnn, _ = _import_fvcore()
    with torch.no_grad(), eval_mode(model), warnings.catch_warnings():
        # jit tracing warns about Python values it freezes; counting is unaffected.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        fca = fvnn.FlopCountAnalysis(model, example_inputs)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_op = fca.by_operator()
        total = int(fca.total())
    return int(by_op.get("conv", 0)), total
