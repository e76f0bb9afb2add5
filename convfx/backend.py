"""A ``torch.compile`` backend that factorizes convolutions, then hands off to another backend.

    model.eval()
    fast = torch.compile(model, backend="convfx",
                         options={"method": "tucker", "rank": 0.5, "delegate": "inductor"})
    with torch.inference_mode():
        y = fast(x)

Why a backend as well as :func:`convfx.compress`: it composes with the rest of
``torch.compile`` (guards, graph breaks, recompiles) so that a model can be compressed and
compiled in one step, with no separate tracing.

How it works. In torch >= 2.5 dynamo lifts module parameters to graph *inputs*: a conv
reaches the backend as ``torch.conv2d(x, <placeholder>, <placeholder>, ...)``. The backend

1. turns the placeholders that feed only convolutions (weights and biases) into ``get_attr``
   nodes on small ``nn.Conv2d`` holders named after the original layers (``layer1.0.conv1``),
   so that :func:`convfx.compress` sees ordinary functional convs on module parameters
   (only module parameters/buffers are frozen, never tensors the caller passes);
2. runs :func:`convfx.compress` on that graph with concrete inputs (dynamo passes real
   tensors; fake tensors and symbolic sizes are replaced by random tensors / size hints —
   only shapes matter for the analysis, the weights are always the real ones);
3. delegates the compressed graph to ``options["delegate"]`` (``"inductor"`` by default) and
   returns a callable with the original graph's signature (the frozen weight arguments are
   accepted and ignored).

Inference only. The conv weights are *frozen* at compile time: later in-place updates of
the model's parameters are not seen by the compiled function (recompile, e.g. with
``torch._dynamo.reset()``), and no gradient reaches the original parameters. Compiling
with grad enabled while conv weights require grad therefore raises :class:`ConvfxError`
(which dynamo reports wrapped in its ``BackendCompilerFailed``);
call the compiled model under ``torch.no_grad()`` / ``torch.inference_mode()`` or after
``model.requires_grad_(False)``.

Reports. Each compiled graph's :class:`~convfx.report.Report` is logged on the ``convfx``
logger and attached to the compiled callable (``convfx_report``). Dynamo keeps that callable
to itself, so a caller that wants the reports passes ``options={"on_report": fn}``: ``fn`` is
called with the report of each graph the backend compresses (a graph break or a recompile
compresses another graph and reports again; a graph without convs is passed on unreported)::

    reports = []
    fast = torch.compile(model, backend="convfx", options={"rank": 0.5, "on_report": reports.append})

The backend keeps no reports of its own: nothing accumulates in a long-running process.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from passes.errors import ConvfxError
from passes.options import CompressOptions

from .api import compress_with
from .report import Report

__all__ = ["BACKEND_NAME", "BackendOptions", "convfx_backend", "register"]

log = logging.getLogger("convfx")

BACKEND_NAME = "convfx"

_CONV_FNS = (torch.conv2d, torch.nn.functional.conv2d)
_OWN_KEYS = ("delegate", "delegate_options", "on_report")
_NOT_FORWARDED = ("inplace",)  # the backend compresses its own graph in place


def _compress_keys() -> list[str]:
    """The :class:`CompressOptions` fields the backend takes from ``options`` (read, not hard-coded)."""
    return [f.name for f in dataclasses.fields(CompressOptions) if f.name not in _NOT_FORWARDED]


@dataclass
class BackendOptions:
    """The ``options={...}`` of ``torch.compile(..., backend="convfx")``, split by destination.

    Keys that are :class:`~passes.options.CompressOptions` fields (``method``, ``rank``,
    ``filter_fn``, ``flops_target``, ``rank_multiple``, ...) build the compression options,
    checked when the options are parsed; ``delegate`` is
    the backend that compiles the compressed graph (a registered name such as
    ``"inductor"``, ``"eager"``, ``"aot_eager"``, or a backend callable),
    ``delegate_options`` go to it as its own ``options`` (for inductor: config patches), and
    ``on_report`` (optional) is called with the :class:`~convfx.report.Report` of each graph
    the backend compresses: the way to see reports, since dynamo keeps the compiled callable.
    """

    compress: CompressOptions = field(default_factory=lambda: CompressOptions(inplace=True, progress=False))
    delegate: str | Callable[..., Any] = "inductor"
    delegate_options: dict[str, Any] = field(default_factory=dict)
    on_report: Callable[[Report], Any] | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> "BackendOptions":
        opts = dict(options or {})
        allowed = _compress_keys()
        unknown = sorted(set(opts) - set(allowed) - set(_OWN_KEYS))
        if unknown:
            raise ValueError(f"options: unknown key(s) {unknown} for backend {BACKEND_NAME!r}; expected "
                             f"some of {allowed + list(_OWN_KEYS)}")
        delegate = opts.pop("delegate", "inductor")
        delegate_options = opts.pop("delegate_options", None) or {}
        on_report = opts.pop("on_report", None)
        if delegate == BACKEND_NAME:
            raise ValueError(f"options: delegate cannot be {BACKEND_NAME!r} itself")
        if not (isinstance(delegate, str) or callable(delegate)):
            raise ValueError(f"options: delegate must be a backend name or a callable, got {delegate!r}")
        if not isinstance(delegate_options, Mapping):
            raise ValueError(f"options: delegate_options must be a dict, got {type(delegate_options).__name__}")
        if on_report is not None and not callable(on_report):
            raise ValueError(f"options: on_report must be a callable taking a Report, got {on_report!r}")
        opts.setdefault("progress", False)  # no progress bars inside a compiler
        return cls(CompressOptions(inplace=True, **opts), delegate, dict(delegate_options), on_report)


@dataclass
class _Frozen:
    """The graph with conv parameters frozen in, and which original inputs it still takes."""

    gm: fx.GraphModule
    keep: list[int]  # positions of the original inputs that remain placeholders
    n_frozen: int


def _source_name(node: fx.Node) -> str | None:
    """Dynamo's description of where a placeholder's value comes from, e.g. ``L['self']._modules[...]``."""
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    if src is None:
        return None
    name = getattr(src, "name", None)
    if callable(name):  # a method in older torch, a property in newer
        name = name()
    return name if isinstance(name, str) else None


_MODULE_KEY = re.compile(r"_modules\['([^']+)'\]")


def _owner_fqn(weight_ph: fx.Node, fallback: str) -> str:
    """The original module path of a lifted conv weight (``layer1.0.conv1``), else ``fallback``."""
    name = _source_name(weight_ph)
    if name and name.endswith("_parameters['weight']"):
        parts = _MODULE_KEY.findall(name)
        if parts and all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in parts):
            return ".".join(parts)
    return fallback


def _conv_args(node: fx.Node) -> tuple[Any, Any, Any, Any, Any, Any]:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    vals: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    vals.update(zip(names, node.args))
    vals.update(node.kwargs)
    return (vals["weight"], vals["bias"], vals["stride"], vals["padding"], vals["dilation"], vals["groups"])


def _holder(weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any, dilation: Any,
            groups: int) -> nn.Conv2d:
    """An ``nn.Conv2d`` that owns the frozen weight, so ``filter_fn`` sees a real conv module."""
    c_out, c_in_g, kh, kw = weight.shape
    conv = nn.Conv2d(c_in_g * groups, c_out, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias is not None, device="meta")
    conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return conv


def _ensure_parents(root: nn.Module, fqn: str) -> None:
    cur = root
    for part in fqn.split(".")[:-1]:
        nxt = cur._modules.get(part)
        if nxt is None:
            nxt = nn.Module()
            cur.add_module(part, nxt)
        cur = nxt


def _taken(gm: fx.GraphModule, fqn: str) -> bool:
    head = fqn.split(".", 1)[0]
    return hasattr(gm, head)


def _freeze_conv_params(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> _Frozen:
    """Replace placeholders that are only conv weights/biases by ``get_attr`` on conv holders.

    Only real (non-fake) module parameters/buffers are frozen, never tensors the caller
    passes; a conv whose weight is anything else is left as it is (``compress`` then reports
    it as skipped).
    """
    from torch._subclasses.fake_tensor import is_fake

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ConvfxError(f"graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs "
                          "were given", where="torch.compile graph")
    value = dict(zip(placeholders, example_inputs))

    def only_conv_use(ph: fx.Node, slot: int) -> bool:
        """``ph`` feeds convs only, always as their weight (slot 0) or bias (slot 1)."""
        for u in ph.users:
            if u.op != "call_function" or u.target not in _CONV_FNS:
                return False
            args = _conv_args(u)
            x = u.args[0] if u.args else u.kwargs.get("input")
            if x is ph or args[slot] is not ph or args[1 - slot] is ph:
                return False
        return bool(ph.users)

    def module_state(ph: fx.Node, v: torch.Tensor) -> bool:
        """A module's parameter or buffer, never a tensor the caller passes (it may change per call)."""
        name = _source_name(ph)
        if name is not None:
            return "._parameters['" in name or "._buffers['" in name
        return isinstance(v, nn.Parameter)

    def usable(ph: Any, slot: int) -> bool:
        v = value.get(ph)
        return (isinstance(ph, fx.Node) and ph.op == "placeholder" and isinstance(v, torch.Tensor)
                and not is_fake(v) and module_state(ph, v) and only_conv_use(ph, slot))

    holders: dict[str, nn.Conv2d] = {}
    frozen: dict[fx.Node, str] = {}  # placeholder -> get_attr target
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CONV_FNS:
            continue
        w, b, stride, padding, dilation, groups = _conv_args(node)
        if w in frozen or not usable(w, 0) or value[w].dim() != 4:
            continue
        if b is not None and not usable(b, 1):
            continue
        fqn = _owner_fqn(w, f"conv{len(holders)}")
        if fqn in holders or _taken(gm, fqn):
            i = 1
            while f"{fqn}_{i}" in holders or _taken(gm, f"{fqn}_{i}"):
                i += 1
            fqn = f"{fqn}_{i}"
        holders[fqn] = _holder(value[w], value[b] if b is not None else None, stride, padding, dilation,
                               int(groups))
        frozen[w] = f"{fqn}.weight"
        if b is not None:
            frozen[b] = f"{fqn}.bias"

    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, remap))
    new_gm = fx.GraphModule(gm, graph, class_name="ConvfxFrozenGraph")  # copies gm's own attributes
    for fqn, conv in holders.items():
        _ensure_parents(new_gm, fqn)
        parent_name, _, leaf = fqn.rpartition(".")
        new_gm.get_submodule(parent_name).add_module(leaf, conv)
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for old, target in frozen.items():
        ph = remap[old]
        with graph.inserting_before(first_op):
            attr = graph.get_attr(target)
        attr.meta.update({k: v for k, v in ph.meta.items() if k in ("example_value", "val", "tensor_meta")})
        ph.replace_all_uses_with(attr)
        graph.erase_node(ph)
    graph.lint()
    new_gm.recompile()
    new_gm.eval()
    keep = [i for i, ph in enumerate(placeholders) if ph not in frozen]
    return _Frozen(new_gm, keep, len(holders))


def _concrete(v: Any) -> Any:
    """A real stand-in for one graph input: shapes are what compress's analysis needs."""
    from torch._subclasses.fake_tensor import is_fake

    if isinstance(v, torch.SymInt):
        hint = getattr(v.node, "hint", None)
        if hint is None:
            raise ConvfxError("a symbolic size has no concrete hint", where="torch.compile graph",
                              hint="compile with dynamic=False")
        return int(hint)
    if isinstance(v, (torch.SymFloat, torch.SymBool)):
        hint = getattr(v.node, "hint", None)
        return hint
    if isinstance(v, torch.Tensor) and not is_fake(v):
        # A copy: the analysis runs the graph, and a train-mode BatchNorm in it would
        # otherwise update the model's running statistics in place.
        return v.detach().clone()
    if isinstance(v, torch.Tensor):
        try:
            shape = [int(s) for s in v.shape]
        except Exception as err:  # noqa: BLE001 - symbolic without a hint
            raise ConvfxError(f"fake input of symbolic shape {tuple(v.shape)}", where="torch.compile graph",
                              hint="compile with dynamic=False") from err
        if v.dtype.is_floating_point or v.dtype.is_complex:
            return torch.randn(shape, dtype=v.dtype, device=v.device)
        return torch.zeros(shape, dtype=v.dtype, device=v.device)
    return v


def _check_inference(frozen_values: Sequence[torch.Tensor]) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in frozen_values):
        raise ConvfxError(
            "the convfx backend is inference-only (it freezes and replaces conv weights), but this graph "
            "was compiled with grad enabled and conv weights that require grad",
            where="torch.compile(backend='convfx')",
            hint="call the compiled model under torch.no_grad() or torch.inference_mode(), or call "
            "model.requires_grad_(False) first",
        )


def _delegate(gm: fx.GraphModule, inputs: list[Any], opts: BackendOptions) -> Callable[..., Any]:
    from torch._dynamo.backends.registry import lookup_backend

    extra = dict(opts.delegate_options)
    if opts.delegate == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs, config_patches=extra or None)
    fn = lookup_backend(opts.delegate)  # type: ignore[arg-type]
    return fn(gm, inputs, options=extra) if extra else fn(gm, inputs)


def convfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                   options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable[..., Any]:
    """Dynamo backend: compress ``gm``'s convs with :func:`convfx.compress`, then delegate.

    ``options``: any keyword of :func:`convfx.compress` (``method``, ``rank``, ``filter_fn``,
    ...), plus ``delegate`` (default ``"inductor"``), ``delegate_options`` and ``on_report``
    (see :class:`BackendOptions`). ``mode``
    (``torch.compile``'s) is forwarded to inductor as its mode options. Only 2-d convs are
    factorized here: dynamo inlines ``nn.Linear`` into a functional call that
    :func:`convfx.compress` does not treat as a factorizable layer.
    """
    opts = BackendOptions.parse(options)
    if mode and mode != "default" and opts.delegate == "inductor":
        from torch._inductor import list_mode_options

        opts.delegate_options = {**list_mode_options(mode), **opts.delegate_options}
    inputs = list(example_inputs)
    frozen = _freeze_conv_params(gm, inputs)
    dropped = [inputs[i] for i in range(len(inputs)) if i not in set(frozen.keep)]
    _check_inference([t for t in dropped if isinstance(t, torch.Tensor)])
    kept = [inputs[i] for i in frozen.keep]
    log.debug("convfx backend: %d conv(s) with lifted weights frozen, %d graph inputs remain",
              frozen.n_frozen, len(kept))
    if frozen.n_frozen == 0:  # e.g. a graph-break fragment without convs: nothing to do
        return _delegate(gm, inputs, opts)

    with torch.no_grad():
        compressed = compress_with(frozen.gm, tuple(_concrete(v) for v in kept), opts.compress)
    report: Report = compressed.convfx_report  # type: ignore[assignment]
    log.info("convfx backend: %d conv(s) factorized, %d skipped; conv MACs %.2fx lower",
             len(report.factorized), len(report.skipped), report.conv_reduction)
    log.debug("convfx backend report:\n%s", report)
    if opts.on_report is not None:
        opts.on_report(report)
    compiled = _delegate(compressed, kept, opts)
    keep = frozen.keep

    def run(*args: Any) -> Any:
        # Dynamo calls backends' results unboxed (positional args), as it calls this one.
        return compiled(*[args[i] for i in keep])

    run.convfx_report = report  # type: ignore[attr-defined]
    run.convfx_graph = compressed  # type: ignore[attr-defined]
    return run


def register() -> None:
    """Register :func:`convfx_backend` as ``"convfx"`` with dynamo; safe to call repeatedly.

    Nothing is done when dynamo already knows the name: registered before, or declared by
    the installed ``torch_dynamo_backends`` entry point (setup.cfg). In that case dynamo
    loads and registers the function itself on first use, and registering it here too
    would make that fail as a duplicate.
    """
    if BACKEND_NAME in torch._dynamo.list_backends(exclude_tags=()):
        return
    torch._dynamo.register_backend(convfx_backend, name=BACKEND_NAME)
