"""Models whose root ``forward`` cannot be traced: compress their largest traceable parts.

Why: detectors, segmenters with data-dependent post-processing, optical flow (RAFT) and
many video nets have a root ``forward`` with Python control flow on tensor values, which
``torch.fx`` cannot trace; their convolutions live in submodules that trace fine (a
backbone, an FPN, the heads).

How:

1. **find the parts** (:func:`find_parts`): from the root down, each child holding a conv is
   tried as it is called when the original model runs once on ``example_inputs`` (forward
   hooks record every call's arguments and outputs). A child whose traced graph reproduces
   those outputs is a part; one that does not trace (or is never called, or takes arguments
   a trace cannot carry) is descended into. Modules without convs are ignored. A plain conv
   always traces, so every conv a module calls is reached unless its own module cannot be
   traced or it is called from untraceable code as a function.
2. **stitch** (:class:`Stitch`): one root module over the *same* submodules whose
   ``forward(idx)`` replays every recorded call of every part, reading the arguments of
   calibration item ``idx`` from a :class:`Bank` leaf, and returns every part output (each
   scaled to unit norm on ``example_inputs``) as one vector. It traces, so the whole
   pipeline runs on it unchanged: analysis, one joint rank allocation over every part's
   convs, calibration fits, ``method="id"`` chains.
3. **install** (:func:`install`): the factor containers (and narrowed modules) the pipeline
   put into the stitch's graph replace the modules of the user's model (a copy unless
   ``inplace``) under the same names. The model's own ``forward`` keeps running: the result
   is the user's ``nn.Module``, not a GraphModule, and exact at full rank by construction.

MACs (:func:`count_calls`): every conv and Linear call of the whole model on
``example_inputs``, counted by fvcore's formulas on the shapes the layers actually see (for a
torchvision detector: the batch its transform produced). The rank budget is over the whole
model: convs outside every part are a fixed cost (:func:`compress_parts`).

This module imports nothing from ``convfx``; :mod:`convfx.parts` builds the report.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .context import Allocation, Context
from .convs import CONV_FUNCTIONS, Site, get_submodule_or_none, set_submodule
from .errors import ConvfxError
from .factors import FactorPlan
from .flops import _import_fvcore, eval_mode, fvcore_macs
from .meta import MACS
from .options import CompressOptions
from .outcome import site_row
from .pipeline import RANK_SOURCES, analyze, check_tensors, finish_rows, select
from .trace import UNTRACEABLE_ROOT, TraceResult, first_line, is_plain_conv, trace

__all__ = ["BANK", "Bank", "Call", "LayerCall", "Part", "PartsOutcome", "Split", "Stitch", "compress_parts",
           "count_calls", "find_parts", "flatten", "install", "item_args", "replay_graph", "root_failure",
           "stitch_graph", "unflatten"]

log = logging.getLogger(__name__)

#: Name of the stitch's :class:`Bank` child (never a name in the user's model).
BANK = "_convfx_bank"
#: A part whose traced graph differs from its forward by more than this (relative to the
#: largest output, each output at unit norm) is not a part.
REPLAY_TOL = 1e-4
#: Why a module that no call reached is not a part.
NOT_CALLED = "not called by the model's forward on example_inputs"
#: Plans at most, when the budget's curves misprice convs called at several shapes.
_REPLANS = 6
#: A re-planned allocation within this fraction of the budget is kept as it is.
_SLACK = 0.99

Spec = Any  # a nested list of plain values describing one call's arguments (see flatten)


# ----------------------------------------------------------------------------- arguments
class _Unsupported(Exception):
    """A value a trace cannot carry: it is neither a tensor, a container of them nor a constant."""


def flatten(obj: Any, leaves: list[Any]) -> Spec:
    """A plain-value description of ``obj``; its tensors (or proxies) are appended to ``leaves``.

    Why plain values: the description is what a saved model records to trace its parts
    again (``torch.load(weights_only=True)`` reads lists, strings and numbers). Tensors
    become ``"T"``; lists, tuples, dicts and OrderedDicts keep their structure; ``None``,
    bools, numbers, strings and ``torch.Size`` are constants. Anything else raises.
    """
    if isinstance(obj, (Tensor, fx.Proxy)):
        leaves.append(obj)
        return "T"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ["C", obj]
    if isinstance(obj, torch.Size):
        return ["S", [int(v) for v in obj]]
    if type(obj) in (list, tuple):
        return ["L" if type(obj) is list else "U", [flatten(v, leaves) for v in obj]]
    if type(obj) in (dict, collections.OrderedDict) and all(isinstance(k, (str, int)) for k in obj):
        return ["O" if type(obj) is collections.OrderedDict else "D", [[k, flatten(v, leaves)] for k, v in obj.items()]]
    raise _Unsupported(type(obj).__name__)


def unflatten(spec: Spec, leaves: Iterator[Any]) -> Any:
    """The value :func:`flatten` described, its tensors taken from ``leaves`` in order."""
    if spec == "T":
        return next(leaves)
    kind, body = spec
    if kind == "C":
        return body
    if kind == "S":
        return torch.Size(body)
    if kind in ("L", "U"):
        items = [unflatten(s, leaves) for s in body]
        return items if kind == "L" else tuple(items)
    pairs = [(k, unflatten(s, leaves)) for k, s in body]
    return collections.OrderedDict(pairs) if kind == "O" else dict(pairs)


def n_tensors(spec: Spec) -> int:
    """How many tensors the value described by ``spec`` holds."""
    if spec == "T":
        return 1
    kind, body = spec
    if kind in ("L", "U"):
        return sum(n_tensors(s) for s in body)
    if kind in ("D", "O"):
        return sum(n_tensors(s) for _, s in body)
    return 0


def _tensor_leaves(value: Any, spec: Spec) -> list[Any]:
    """The values of ``value`` where ``spec`` (its eager structure) has tensors.

    Why not flatten the traced value: a traced part may return proxies where its eager
    forward returned Python numbers (e.g. shapes); those are no outputs to compare.
    """
    if spec == "T":
        return [value]
    kind, body = spec
    if kind in ("L", "U"):
        if not isinstance(value, (list, tuple)) or len(value) != len(body):
            raise TypeError("the traced output does not have the structure of the eager one")
        return [leaf for v, s in zip(value, body) for leaf in _tensor_leaves(v, s)]
    if kind in ("D", "O"):
        if not isinstance(value, dict) or list(value) != [k for k, _ in body]:
            raise TypeError("the traced output does not have the keys of the eager one")
        return [leaf for k, s in body for leaf in _tensor_leaves(value[k], s)]
    return []


@dataclass
class Call:
    """One recorded call of a part: its arguments ``(args, kwargs)`` and its output, as specs."""

    inputs: Spec
    output: Spec

    def to_dict(self) -> dict[str, Any]:
        return {"in": self.inputs, "out": self.output}


@dataclass
class Part:
    """A traceable submodule (``path`` from the root) and the calls the model makes to it."""

    path: str
    calls: list[Call]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "calls": [c.to_dict() for c in self.calls]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Part":
        return cls(str(d["path"]), [Call(c["in"], c["out"]) for c in d["calls"]])


# ------------------------------------------------------------------------------ recording
@dataclass
class _Rec:
    """One call seen by a hook: specs and (cloned) tensors, or why it cannot be replayed."""

    inputs: Spec = None
    tensors: list[Tensor] = field(default_factory=list)
    output: Spec = None
    out_tensors: list[Tensor] = field(default_factory=list)
    unsupported: str | None = None


def _clone(ts: list[Any]) -> list[Tensor]:
    # Cloned: the caller may modify an argument or an output in place after the call.
    return [t.detach().clone() for t in ts]


class _Recorder:
    """Forward hooks that record every call of the given modules (arguments, outputs)."""

    def __init__(self, modules: dict[str, nn.Module], outputs: bool) -> None:
        self.calls: dict[str, list[_Rec]] = {p: [] for p in modules}
        self._open: dict[str, list[_Rec]] = {p: [] for p in modules}
        self._outputs = outputs
        self._handles: list[Any] = []
        for path, m in modules.items():
            self._handles.append(m.register_forward_pre_hook(self._pre(path), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(path), with_kwargs=True))

    def _pre(self, path: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            rec = _Rec()
            leaves: list[Any] = []
            try:
                rec.inputs = flatten((tuple(args), dict(kwargs)), leaves)
                rec.tensors = _clone(leaves)
            except _Unsupported as err:
                rec.unsupported = (f"called with an argument of type {err} (a trace carries tensors, lists, "
                                   "tuples and dicts of them, and plain constants)")
            self.calls[path].append(rec)
            self._open[path].append(rec)
        return hook

    def _post(self, path: str) -> Any:
        def hook(_m: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any) -> None:
            rec = self._open[path].pop()
            if not self._outputs or rec.unsupported:
                return
            leaves: list[Any] = []
            try:
                rec.output = flatten(output, leaves)
                rec.out_tensors = _clone(leaves)
            except _Unsupported as err:
                rec.unsupported = (f"returns a value of type {err} (outputs are compared as tensors, lists, tuples "
                                   "and dicts of them)")
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------------- counting
@dataclass
class LayerCall:
    """One conv or Linear call of an eagerly run model, with its fvcore-convention MACs."""

    fqn: str  # the module owning the weight ("" when the weight belongs to no module)
    op: str
    kind: str  # "conv" | "linear"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    macs: int


class _CountMode(TorchFunctionMode):
    """Records every conv / Linear function call (module or functional) with its MACs."""

    def __init__(self, owners: dict[int, str]) -> None:
        super().__init__()
        self.owners = owners
        self.calls: list[LayerCall] = []
        self._conv_flops = _import_fvcore()[1].conv_flop_count

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        conv = CONV_FUNCTIONS.get(func)
        if conv is None and func is not nn.functional.linear:
            return out
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if not (isinstance(x, Tensor) and isinstance(w, Tensor) and isinstance(out, Tensor)):
            return out
        fqn = self.owners.get(id(w), "")
        xs, ws, ys = tuple(x.shape), tuple(w.shape), tuple(out.shape)
        if conv is None:
            macs, kind = int(x.numel() * ws[0]), "linear"
        else:
            macs, kind = int(self._conv_flops(list(xs), list(ws), list(ys), conv[1])), "conv"
        self.calls.append(LayerCall(fqn, getattr(func, "__name__", str(func)), kind, xs, ys, ws, macs))
        return out


def _owners(model: nn.Module) -> dict[int, str]:
    """id(weight) -> the qualified name of the module that holds it."""
    owners: dict[int, str] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor):
            owners.setdefault(id(w), name)
    return owners


def _run(model: nn.Module, inputs: tuple[Any, ...], what: str) -> Any:
    """``model(*inputs)``; a failure is a ConvfxError naming the model (and ``what`` was run)."""
    try:
        return model(*inputs)
    except Exception as err:  # noqa: BLE001 - re-raised naming the model
        raise ConvfxError(f"{what} do not fit the model: {first_line(err)}", where=type(model).__name__,
                          hint="pass a tuple of the forward's positional arguments, e.g. ([image],) for a "
                               "torchvision detector, which takes a list of images") from err


def count_calls(model: nn.Module, inputs: tuple[Any, ...]) -> list[LayerCall]:
    """Every conv and Linear call of one eager run of ``model`` on ``inputs`` (eval mode, no grad)."""
    with torch.no_grad(), eval_mode(model), _CountMode(_owners(model)) as mode:
        _run(model, inputs, "example_inputs")
    return mode.calls


# ---------------------------------------------------------------------------------- stitch
class Bank(nn.Module):
    """The recorded arguments of every part call, one flat list of tensors per item.

    Item 0 holds the example inputs' calls, items 1.. the calibration items'. A leaf of the
    stitch's graph: its ``forward(idx)`` returns item ``idx``'s tensors. Several indices
    (the pipeline's sample of the first calibration inputs) concatenate the items along
    dim 0 where every item has the same trailing shape, else give the first item alone.
    """

    def __init__(self, items: list[list[Tensor]]) -> None:
        super().__init__()
        self.items = items

    def forward(self, idx: Tensor) -> list[Tensor]:
        rows = list(dict.fromkeys(int(i) for i in idx.reshape(-1).tolist()))
        first = self.items[rows[0]]
        picked = [self.items[r] for r in rows]
        if len(picked) == 1 or not all(_stackable([it[j] for it in picked]) for j in range(len(first))):
            return list(first)
        return [torch.cat([it[j] for it in picked]) for j in range(len(first))]

    def __deepcopy__(self, memo: dict[int, Any]) -> "Bank":
        return self  # read-only and possibly large: graph copies share it


def _stackable(ts: list[Tensor]) -> bool:
    t0 = ts[0]
    return t0.dim() >= 2 and t0.is_floating_point() and all(
        t.dtype == t0.dtype and t.shape[1:] == t0.shape[1:] for t in ts)


class Stitch(nn.Module):
    """A traceable root over ``model``'s submodules that replays every call of every part.

    Its children are ``model``'s own (shared, so qualified names are the model's), plus the
    :class:`Bank`. ``forward(idx)`` unflattens item ``idx``'s arguments of each recorded
    call, calls the part, and returns every tensor output times its scale, as one vector:
    the single output that the pipeline's sensitivity and discrepancy measures need.
    """

    def __init__(self, model: nn.Module, parts: list[Part], bank: Bank, scales: list[float] | None = None) -> None:
        super().__init__()
        for name, child in model.named_children():
            self._modules[name] = child
        self._modules[BANK] = bank
        self._convfx_parts = parts
        n_out = sum(n_tensors(c.output) for p in parts for c in p.calls)
        self._convfx_scales = list(scales) if scales is not None else [1.0] * n_out
        self.training = model.training

    def forward(self, idx: Tensor) -> Tensor:
        flat = self._modules[BANK](idx)
        k, outs = 0, []
        for part in self._convfx_parts:
            module = self.get_submodule(part.path)
            for call in part.calls:
                n = n_tensors(call.inputs)
                args, kwargs = unflatten(call.inputs, iter([flat[k + i] for i in range(n)]))
                k += n
                outs.extend(_tensor_leaves(module(*args, **kwargs), call.output))
        if not outs:
            return torch.zeros(1)
        return torch.cat([o.flatten().to(torch.float64) * s for o, s in zip(outs, self._convfx_scales)])


def stitch_graph(stitch: Stitch) -> fx.GraphModule:
    """The stitch traced in eval mode (what the captures saw), nothing demoted to a leaf but the bank."""
    with eval_mode(stitch):
        return trace(stitch, leaves={BANK}, strict=True, quiet=True).gm


def replay_graph(model: nn.Module, parts: Any, where: str) -> fx.GraphModule:
    """The stitch's graph over ``model`` from a saved description of its parts; nothing runs.

    What :func:`convfx.load` rebuilds a part model's structure on: the same trace as at
    compression, so the same sites (and ``method="id"`` chains) are found.
    """
    try:
        found = [Part.from_dict(d) for d in parts["parts"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConvfxError(f"malformed parts description: {exc!r}", where=where) from exc
    missing = [p.path for p in found if get_submodule_or_none(model, p.path) is None]
    if missing:
        raise ConvfxError(f"part(s) {', '.join(missing[:5])} are not modules of this model", where=where,
                          hint="the model is a different architecture from the one the file was saved from")
    return stitch_graph(Stitch(model, found, Bank([])))


def _scales(outs: list[Tensor]) -> list[float]:
    """1 / norm of each output, so each part output weighs alike in the stitch's vector."""
    scales = []
    for t in outs:
        norm = float(t.detach().double().nan_to_num(0.0, 0.0, 0.0).norm())
        scales.append(1.0 / norm if math.isfinite(norm) and norm > 0 else 1.0)
    return scales


def _relative_diff(y: Tensor, ref: Tensor) -> float:
    """max |y - ref| / max |ref| over the entries where they differ (equal infs and NaNs match)."""
    if y.shape != ref.shape:
        return math.inf
    same = (y == ref) | (y.isnan() & ref.isnan())
    diff = (y - ref).abs().masked_fill(same, 0.0)
    if bool(diff.isnan().any()):
        return math.inf
    scale = float(ref.nan_to_num(0.0, 0.0, 0.0).abs().max()) if ref.numel() else 0.0
    return float(diff.max()) / max(scale, 1e-30) if diff.numel() else 0.0


# ---------------------------------------------------------------------------------- discovery
@dataclass
class Split:
    """Where a model with an untraceable root is compressed: its parts, and what is not a part."""

    root: str  # why the root cannot be traced (the first line of the failure)
    parts: list[Part]
    untraced: dict[str, str]  # module path -> why it is not a part
    example: list[Tensor]  # every part call's tensor arguments on example_inputs, in order
    scales: list[float]  # per part output tensor (see Stitch)
    calls: list[LayerCall]  # every conv / Linear call of the whole model on example_inputs

    def to_dict(self) -> dict[str, Any]:
        """What a saved model records (:mod:`convfx.serialize`): plain values only."""
        return {"root": self.root, "parts": [p.to_dict() for p in self.parts], "untraced": dict(self.untraced)}

    def inside(self, fqn: str) -> str | None:
        """The part ``fqn`` belongs to, if any."""
        return next((p.path for p in self.parts if fqn == p.path or fqn.startswith(p.path + ".")), None)


def root_failure(model: nn.Module, inputs: tuple[Any, ...] | None = None) -> str | None:
    """Why ``model``'s root cannot be compressed as one graph (first line), or None when it can.

    Either its ``forward`` does not trace, or (given ``inputs``) the traced graph fails, run
    node by node as the pipeline's passes run it (:class:`torch.fx.Interpreter`), where the
    model itself runs: e.g. a function fx keeps as one call mutates a list argument, which the
    interpreter passes as fx's immutable list (torchvision's Swin3d). Inputs that the model
    itself rejects are the pipeline's to report.
    """
    try:
        gm = trace(model, quiet=True).gm
    except ConvfxError as err:
        if err.kind != UNTRACEABLE_ROOT:
            raise
        return _sentence(first_line(err.__cause__) if err.__cause__ is not None else err.reason)
    if inputs is None:
        return None
    with torch.no_grad(), eval_mode(gm):
        try:
            fx.Interpreter(gm).run(*inputs)
            return None
        except Exception as err:  # noqa: BLE001 - the graph fails: does the model itself run?
            failure = _sentence(first_line(err))
    with torch.no_grad(), eval_mode(model):
        try:
            model(*inputs)
        except Exception:  # noqa: BLE001 - bad inputs: the pipeline names the node they do not fit
            return None
    return f"its traced graph fails where its forward runs ({failure})"


def _sentence(text: str, limit: int = 200) -> str:
    """The first sentence of a failure's first line (torch.fx appends paragraphs of advice)."""
    head = text.split(". ", 1)[0]
    return head if len(head) <= limit else head[:limit - 3] + "..."


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(x, nn.modules.conv._ConvNd) for x in m.modules())


def _children(path: str, module: nn.Module, seen: set[int]) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        if id(child) not in seen and _has_conv(child):
            seen.add(id(child))
            out.append((f"{path}.{name}" if path else name, child))
    return out


def _replays(model: nn.Module, path: str, recs: list[_Rec]) -> str | None:
    """None if ``path`` traces and its graph reproduces every recorded call; else why not."""
    part = Part(path, [Call(r.inputs, r.output) for r in recs])
    outs = [t for r in recs for t in r.out_tensors]
    scales = _scales(outs)
    stitch = Stitch(model, [part], Bank([[t for r in recs for t in r.tensors]]), scales)
    try:
        gm = stitch_graph(stitch)
    except ConvfxError as err:
        cause = _sentence(first_line(err.__cause__) if err.__cause__ is not None else err.reason)
        inner = f" in {err.where!r}" if err.where not in (path, type(stitch).__name__) else ""
        return f"{cause}{inner}"
    try:  # node by node, as the pipeline's passes run it
        with torch.no_grad(), eval_mode(gm):
            y = fx.Interpreter(gm).run(torch.zeros(1, dtype=torch.long))
    except Exception as err:  # noqa: BLE001 - the traced graph does not run: not a part
        return f"its traced graph fails on the recorded arguments ({_sentence(first_line(err))})"
    ref = torch.cat([o.flatten().to(torch.float64) * s for o, s in zip(outs, scales)]) if outs else torch.zeros(1)
    err = _relative_diff(y, ref)
    if err > REPLAY_TOL:
        return f"its traced graph does not reproduce its forward (relative difference {err:.2g})"
    return None


def find_parts(model: nn.Module, inputs: tuple[Any, ...], root: str) -> Split:
    """The largest submodules of ``model`` that trace and replay their recorded calls.

    Breadth first from the root, one eager run of the model per depth (forward hooks on that
    depth's candidates); the first run also counts every conv/Linear call (:func:`count_calls`).
    Runs in eval mode without gradients.
    """
    seen: set[int] = {id(model)}
    frontier = _children("", model, seen)
    parts: list[tuple[str, list[_Rec]]] = []
    untraced: dict[str, str] = {}
    calls: list[LayerCall] | None = None
    with torch.no_grad(), eval_mode(model):
        while frontier:
            rec = _Recorder(dict(frontier), outputs=True)
            try:
                if calls is None:
                    with _CountMode(_owners(model)) as mode:
                        _run(model, inputs, "example_inputs")
                    calls = mode.calls
                else:
                    _run(model, inputs, "example_inputs")
            finally:
                rec.close()
            deeper: list[tuple[str, nn.Module]] = []
            for path, module in frontier:
                recs = rec.calls[path]
                why = next((r.unsupported for r in recs if r.unsupported), None) if recs else NOT_CALLED
                why = why or _replays(model, path, recs)
                if why is None:
                    parts.append((path, recs))
                    continue
                untraced[path] = why
                deeper.extend(_children(path, module, seen))
            frontier = deeper
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    parts.sort(key=lambda pr: order.get(pr[0], len(order)))
    outs = [t for _, recs in parts for r in recs for t in r.out_tensors]
    return Split(root=root, parts=[Part(p, [Call(r.inputs, r.output) for r in recs]) for p, recs in parts],
                 untraced=untraced, example=[t for _, recs in parts for r in recs for t in r.tensors],
                 scales=_scales(outs), calls=calls or [])


# ------------------------------------------------------------------------------- calibration
def item_args(item: Any, like: tuple[Any, ...], i: int) -> tuple[Any, ...]:
    """The positional arguments a calibration item stands for, shaped like ``example_inputs``.

    A tensor is the one argument; a tuple (or a DataLoader's list) holds the arguments, of
    which the first ``len(example_inputs)`` are used (labels and targets after them are
    dropped); when the example's first argument is a list (a detector's images), a plain
    list of tensors is that list: one batch of images.
    """
    if isinstance(item, Tensor):
        return (item,)
    if isinstance(item, list) and like and isinstance(like[0], (list, tuple)) \
            and all(isinstance(t, Tensor) for t in item):
        return (item,)
    if isinstance(item, (tuple, list)) and item:
        return tuple(item[:len(like)])
    raise ValueError(f"calibration: item {i} is a {type(item).__name__}; expected a tensor or a tuple of the "
                     "forward's positional arguments (as example_inputs)")


def _to_model(obj: Any, ref: Tensor | None) -> Any:
    """Floating tensors in ``obj`` on the model's device and dtype (containers kept)."""
    if ref is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device=ref.device, dtype=ref.dtype) if obj.is_floating_point() else obj.to(ref.device)
    if type(obj) in (list, tuple):
        return type(obj)(_to_model(v, ref) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _to_model(v, ref)) for k, v in obj.items())
    return obj


def capture_calibration(model: nn.Module, inputs: tuple[Any, ...], options: CompressOptions,
                        split: Split) -> list[list[Tensor]]:
    """Each calibration item's part arguments: the original model runs on it with hooks on the parts.

    Every item must call the parts as ``example_inputs`` did (same calls, same structure,
    same constants): the stitch's graph replays that.
    """
    if options.calibration is None:
        return []
    try:
        iterator = iter(options.calibration)
    except TypeError:
        raise ValueError(f"calibration: expected an iterable of items, got "
                         f"{type(options.calibration).__name__}") from None
    ref = next(iter(model.parameters()), None)
    modules = {p.path: model.get_submodule(p.path) for p in split.parts}
    out: list[list[Tensor]] = []
    with torch.no_grad(), eval_mode(model):
        for i, item in enumerate(iterator):
            if options.calibration_batches is not None and i >= options.calibration_batches:
                break
            args = _to_model(item_args(item, inputs, i), ref)
            rec = _Recorder(modules, outputs=False)
            try:
                try:
                    model(*args)
                except Exception as err:  # noqa: BLE001 - re-raised naming the item
                    raise ConvfxError(f"item {i} does not fit the model: {first_line(err)}",
                                      where="calibration") from err
            finally:
                rec.close()
            flat: list[Tensor] = []
            for part in split.parts:
                seen = rec.calls[part.path]
                if len(seen) != len(part.calls) or any(r.inputs != c.inputs for r, c in zip(seen, part.calls)):
                    raise ConvfxError(f"item {i} calls part {part.path!r} otherwise than example_inputs do "
                                      f"({len(seen)} call(s) vs {len(part.calls)}, or other argument structure "
                                      "or constants)", where="calibration",
                                      hint="calibration items must run the model as example_inputs do "
                                           "(same number of images per item, same options)")
                flat.extend(t for r in seen for t in r.tensors)
            if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in flat):
                raise ConvfxError(f"item {i} gives the parts NaN or inf inputs", where="calibration")
            out.append(flat)
    if not out:
        raise ValueError("calibration: the iterable yielded no items")
    return out


# ---------------------------------------------------------------------------------- install
def install(gm: fx.GraphModule, model: nn.Module, originals: set[int]) -> None:
    """Put every module the pipeline replaced in ``gm`` into ``model`` under the same name.

    ``gm``'s hierarchy mirrors ``model``'s: intermediate modules are plain ``nn.Module``
    placeholders fx created, leaves are ``model``'s own objects (``originals``: their ids)
    until a pass swapped them (factor containers, narrowed BatchNorms).
    """
    targets = [str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
    for target in targets:
        names = target.split(".")
        for i in range(1, len(names) + 1):
            path = ".".join(names[:i])
            obj = gm.get_submodule(path) if _is_module_path(gm, path) else None
            if obj is None:
                break
            if id(obj) in originals:
                break  # the model's own module: everything under it is shared
            if type(obj) is nn.Module:
                continue  # fx's placeholder for an intermediate module
            if get_submodule_or_none(model, path) is not obj:
                set_submodule(model, path, obj)
            break


def _is_module_path(root: nn.Module, path: str) -> bool:
    return isinstance(get_submodule_or_none(root, path), nn.Module)


# --------------------------------------------------------------------------------- pipeline
@dataclass
class PartsOutcome:
    """What :func:`compress_parts` did: the compressed model, the pipeline's context, the counts."""

    model: nn.Module
    ctx: Context
    split: Split
    conv_before: int
    conv_after: int
    linear_before: int
    linear_after: int
    n_items: int = 0


def _refuse(options: CompressOptions, root: str) -> None:
    why = f"the model's root cannot be traced ({root}), so only its parts are compressed"
    if options.distill_steps:
        raise ValueError(f"distill_steps: {why}, and there is no traced whole-model output to distil; "
                         "compress without it")
    if options.latency_target is not None:
        raise ValueError(f"latency_target: {why}, and the whole model cannot be timed as a graph; "
                         "use flops_target")


def _guarded(options: CompressOptions, excluded: dict[str, str]) -> CompressOptions:
    """The options with a filter that keeps the user's choice but takes module convs only.

    Why: a conv subclass traced into (or a function on a module's weight) is rewritten in the
    graph, but a part keeps running its own ``forward``: only whole conv modules can be swapped.
    """
    user = options.select

    def select(module: nn.Module, fqn: str) -> bool:
        if not user(module, fqn):
            return False
        if isinstance(module, nn.Linear) or is_plain_conv(module):
            return True
        excluded[fqn] = ("called as a function from its module's own forward, which a part keeps running "
                         "(only conv modules are swapped)")
        return False

    return options.replace(filter_fn=select)


def _outside_rows(ctx: Context, model: nn.Module, split: Split, excluded: dict[str, str]) -> None:
    """Rows of convs outside every part: the real reason and their counted MACs."""
    macs: dict[str, int] = collections.Counter()
    for c in split.calls:
        if c.kind == "conv":
            macs[c.fqn] += c.macs
    for row in ctx.rows:
        if row.fqn in excluded and row.skipped is not None:
            row.skipped = excluded[row.fqn]
        if split.inside(row.fqn) is not None:
            continue
        row.skipped = _outside_reason(row.fqn, split, row.fqn in macs)
        row.macs_before = row.macs_after = macs.get(row.fqn, 0)
        mod = get_submodule_or_none(model, row.fqn)
        n_params = sum(p.numel() for p in mod.parameters(recurse=False)) if mod is not None else 0
        row.params_before = row.params_after = n_params


def _outside_reason(fqn: str, split: Split, called: bool) -> str:
    """Why a conv outside every part is left alone (``called``: the count saw its weight used)."""
    if not called:
        return NOT_CALLED
    why = split.untraced.get(fqn, NOT_CALLED)
    if why != NOT_CALLED:
        return f"its forward cannot be traced ({why})"
    owner = max((p for p in split.untraced if fqn.startswith(p + ".")), key=len, default="")
    return (f"used as a function (not through its forward) by {owner or 'the root'!r}, which cannot be traced "
            f"({split.untraced.get(owner, split.root)})")


def _allocated_macs(ctx: Context, plans: dict[str, Any]) -> int:
    """The whole model's conv MACs under ``plans``, each layer's calls costed at their own shapes."""
    saved = 0
    for site in ctx.chosen:
        plan = plans.get(site.fqn)
        if isinstance(plan, FactorPlan):
            row = site_row(site, plan, None)
            saved += row.macs_before - row.macs_after
    return ctx.conv_before - saved


@contextlib.contextmanager
def _priced_per_call(sites: list[Site]) -> Iterator[None]:
    """While planning, each conv called at several shapes stands as copies of its cheapest call.

    Why: the budget's candidate curves price a conv as its number of calls times its first
    call's cost (:func:`passes.budget.candidates`). A detector head runs one conv on every
    pyramid level, and the first (largest) level, counted once per level, overprices it
    several times over. Copies of the cheapest call, as many as its cost goes into the sum of
    all calls, price every candidate within rounding of its true cost (exactly for stride-1
    convs on a 2x pyramid); :func:`_plan_within_budget` checks the result call by call.
    """
    saved = {id(s): list(s.nodes) for s in sites}
    for s in sites:
        macs = [int(n.meta.get(MACS, 0)) for n in s.nodes]
        if len(set(macs)) > 1 and min(macs) > 0:
            i = min(range(len(macs)), key=macs.__getitem__)
            s.nodes[:] = [s.nodes[i]] * max(1, round(sum(macs) / macs[i]))
    try:
        yield
    finally:
        for s in sites:
            s.nodes[:] = saved[id(s)]


def _plan_within_budget(ctx: Context, plan: Callable[[Context], list[Allocation]]) -> list[Allocation]:
    """``plan(ctx)`` with every call priced near its own shape, re-planned tighter until it fits.

    The cheapest call's copies (:func:`_priced_per_call`) only approximate a conv's calls;
    an allocation whose cost, call by call (:func:`_allocated_macs`), exceeds the budget is
    planned again at ``flops_target`` scaled by budget / cost; when one fits, the slack left
    is recovered by halving the interval once. A plan that fits at once is not redone.
    """
    target = ctx.options.flops_target
    if ctx.options.rank_source != "budget" or target is None:
        return plan(ctx)
    budget = int(math.floor(float(target) * ctx.conv_before))
    options = ctx.options
    fits: tuple[int, list[Allocation]] | None = None
    lo, hi, priced = 0.0, float(target), float(target)
    try:
        with _priced_per_call(ctx.chosen):
            for _ in range(_REPLANS):
                ctx.options = options.replace(flops_target=priced)
                allocations = plan(ctx)
                cost = max(_allocated_macs(ctx, a.plans) for a in allocations)
                if cost <= budget:
                    if fits is None or cost > fits[0]:
                        fits = (cost, allocations)
                    if priced == float(target) or cost >= _SLACK * budget:
                        break
                    lo = priced
                else:
                    hi = priced
                log.info("flops_target %s: allocation at %.4f costs %d conv MACs call by call (budget %d)",
                         target, priced, cost, budget)
                priced = (lo + hi) / 2 if fits is not None else priced * budget / cost
    finally:
        ctx.options = options
    if fits is None:
        raise ValueError(f"flops_target: unreachable; no allocation fit {budget:,} conv MACs once each call "
                         "was costed at its own shape")
    return fits[1]


def compress_parts(model: nn.Module, inputs: tuple[Any, ...], options: CompressOptions,
                   assumptions: list[str], root: str) -> PartsOutcome:
    """Compress the traceable parts of ``model`` (whose root cannot be traced) in one pipeline run.

    One joint allocation over every part's convs: the pipeline sees the stitch, and its
    conv-MAC total is set to the whole model's, so ``flops_target`` counts the convs outside
    the parts as a fixed cost. Calibration items are captured per part by hooks
    (:func:`capture_calibration`). Returns the model (a copy unless ``inplace``) with its
    parts' layers replaced.
    """
    _refuse(options, root)
    check_tensors(model, finite=options.calibration is not None)
    split = find_parts(model, inputs, root)
    if not split.parts:
        tried = "; ".join(f"{p}: {w}" for p, w in list(split.untraced.items())[:4])
        raise ConvfxError(f"cannot be traced by torch.fx ({root}), and no submodule with convolutions traces "
                          f"either{': ' + tried if tried else ' (it has no convolutions)'}",
                          where=type(model).__name__,
                          hint="move data-dependent control flow out of the modules that hold the convs")
    items = capture_calibration(model, inputs, options, split)
    work = model if options.inplace else copy.deepcopy(model)
    originals = {id(m) for m in work.modules()}
    bank = Bank([split.example, *items])
    stitch = Stitch(work, split.parts, bank, split.scales)
    excluded: dict[str, str] = {}
    ctx = Context(_guarded(options, excluded), stitch, (torch.zeros(1, dtype=torch.long),), list(assumptions))
    ctx.batches = [(torch.full((1,), i, dtype=torch.long),) for i in range(1, len(bank.items))]
    ctx.src = stitch
    ctx.traced = TraceResult(stitch_graph(stitch))
    if ctx.batches:  # the untouched original: a copy of it when the model itself is being changed
        original = copy.deepcopy(model) if options.inplace else model
        ctx.ref = stitch_graph(Stitch(original, split.parts, bank, split.scales))
    analyze(ctx)
    parts_before = ctx.conv_before
    conv_before = sum(c.macs for c in split.calls if c.kind == "conv")
    ctx.conv_before = conv_before  # the budget is over the whole model's convs
    select(ctx)
    source = RANK_SOURCES[ctx.options.rank_source]
    source.fit(ctx, _plan_within_budget(ctx, source.plan))
    finish_rows(ctx)
    _outside_rows(ctx, work, split, excluded)
    install(ctx.gm, work, originals)
    parts_after = fvcore_macs(ctx.gm, ctx.inputs)[0]
    linear_before = sum(c.macs for c in split.calls if c.kind == "linear")
    linear_saved = sum(r.macs_before - r.macs_after for r in ctx.rows if r.kind == "linear")
    return PartsOutcome(work, ctx, split, conv_before, conv_before - parts_before + parts_after,
                        linear_before, linear_before - linear_saved, len(items))
