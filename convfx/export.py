"""Ship a compressed model as a ``torch.export`` archive (``.pt2``).

    gm = convfx.compress(model, x, rank=0.5)
    path = convfx.export.export(gm, x, "model.pt2", dynamic_batch=True)
    runnable = torch.export.load(path).module()

Why: a ``.pt2`` is the deployment format of the PyTorch 2 stack (AOTInductor, ExecuTorch,
``torch.export.load``); it needs neither convfx nor the model's Python source to run. The
archive is written atomically (temporary file in the same folder, then rename), so a crash
never leaves a truncated file under the final name. The compression report, when present,
travels inside the archive as ``extra_files["convfx_report.json"]``.
"""
from __future__ import annotations

import linecache
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from passes.errors import ConvfxError
from passes.flops import eval_mode, node_label

from .api import _as_tuple
from .checkpoint import _fsync_dir

__all__ = ["REPORT_FILE", "export"]

log = logging.getLogger("convfx")

#: Name of the report inside the archive's ``extra_files``.
REPORT_FILE = "convfx_report.json"


def _batch_shapes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``dynamic_shapes`` marking dim 0 of every tensor input as one shared batch size."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def _node_from_traceback(gm: fx.GraphModule, err: BaseException) -> fx.Node | None:
    """The innermost node of ``gm`` that was executing when export failed.

    Export runs a GraphModule either through its generated ``forward`` (one assignment
    per node) or through ``fx.Interpreter.run_node``; the traceback of ``err`` (or of an
    exception it chains) shows which, and where.
    """
    code = getattr(type(gm).forward, "__code__", None)
    run_node = fx.Interpreter.run_node.__code__
    nodes = {n.name: n for n in gm.graph.nodes}
    seen: set[int] = set()
    exc: BaseException | None = err
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found: fx.Node | None = None
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if code is not None and frame.f_code is code:
                m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", linecache.getline(code.co_filename, tb.tb_lineno))
                if m and m.group(1) in nodes:
                    found = nodes[m.group(1)]
            elif frame.f_code is run_node:
                interp, node = frame.f_locals.get("self"), frame.f_locals.get("n")
                if getattr(interp, "module", None) is gm and isinstance(node, fx.Node):
                    found = node
            tb = tb.tb_next
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def _culprit(model: nn.Module, err: BaseException) -> str:
    """The graph node (or submodule) export failed in, else the model's class name."""
    if isinstance(model, fx.GraphModule):
        node = _node_from_traceback(model, err)
        if node is not None:
            return node_label(model, node)
        text = str(err)
        for node in model.graph.nodes:  # a submodule path quoted in the message
            if node.op == "call_module" and re.search(rf"['\"`]{re.escape(str(node.target))}['\"`]", text):
                return node_label(model, node)
    return type(model).__name__


def _capture_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Batch-1 examples grown to batch 2: export would specialise a size-1 batch to a constant."""
    return tuple(a.expand(2, *a.shape[1:]).contiguous() if isinstance(a, torch.Tensor) and a.dim() > 0
                 and a.shape[0] == 1 else a for a in args)


def _first_lines(err: BaseException, n: int = 3) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: " + (" / ".join(lines[:n]) if lines else "(no message)")


def export(gm: nn.Module, example_inputs: torch.Tensor | Sequence[Any], path: str | os.PathLike[str], *,
           dynamic_batch: bool = False, training: bool = False) -> Path:
    """Export ``gm`` with ``torch.export.export`` and save it to ``path`` atomically.

    Args:
        gm: a compressed ``GraphModule`` (or any module ``torch.export`` can capture).
        example_inputs: a tensor or tuple of tensors, as for :func:`convfx.compress`.
        path: the ``.pt2`` file to write; its folder must exist.
        dynamic_batch: export with dimension 0 of every tensor input symbolic (one shared
            batch size, 1..65536), so the archive accepts any batch size. Export proves the
            graph is batch-independent or fails (as :class:`ConvfxError`). A batch-1 example
            is traced at batch 2 (export would otherwise fix a size-1 batch as a constant).
        training: export in the module's training mode; by default the graph is captured
            in eval mode (BatchNorm running statistics, no dropout) and the flags are restored.

    Returns the resolved path. Raises :class:`ConvfxError` naming the node or submodule
    export choked on when it can tell, and leaves no file behind.
    """
    if not isinstance(gm, nn.Module):
        raise ValueError(f"gm: expected an nn.Module, got {type(gm).__name__}")
    args = _as_tuple(example_inputs)
    target = Path(path).expanduser().resolve()
    if not target.parent.is_dir():
        raise ValueError(f"path: folder {str(target.parent)!r} does not exist")
    if target.suffix != ".pt2":
        log.info("export: %s does not end in .pt2; torch.export.load does not care, tools might", target)
    dynamic = _batch_shapes(args) if dynamic_batch else None
    trace_args = _capture_args(args) if dynamic_batch else args

    def capture() -> torch.export.ExportedProgram:
        return torch.export.export(gm, trace_args, dynamic_shapes=dynamic, strict=False)

    try:
        if training:
            program = capture()
        else:
            with eval_mode(gm):
                program = capture()
    except Exception as err:  # noqa: BLE001 - re-raised as ConvfxError with context
        hint = "the full torch.export error is chained to this one (__cause__)"
        if dynamic_batch:
            hint = "the graph may depend on the batch size (e.g. a reshape with a fixed batch); retry " \
                   "with dynamic_batch=False"
        raise ConvfxError(f"torch.export failed: {_first_lines(err)}", where=_culprit(gm, err),
                          hint=hint) from err

    extra: dict[str, Any] = {}
    report = getattr(gm, "convfx_report", None)
    if report is not None and hasattr(report, "to_json"):
        extra[REPORT_FILE] = report.to_json()

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), (target.stat().st_mode & 0o777) if target.exists() else 0o644)
            torch.export.save(program, fh, extra_files=extra or None)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    log.info("exported %s to %s (%s batch)", type(gm).__name__, target, "dynamic" if dynamic_batch else "static")
    return target
