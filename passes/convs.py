"""Find factorizable layers in a traced graph, whichever way they are called.

A convolution (1-, 2- or 3-d, plain or transposed) reaches the graph either as a
``call_module`` on a plain conv module or, when a conv subclass overrides ``forward``, as a
``call_function`` (``conv2d``, ``conv_transpose1d``, ...) whose weight (and bias) are
``get_attr`` nodes. Both are described by one :class:`Site`, keyed by the qualified name of
the module that owns the weight, so that a module called twice is factorized once and the
factors keep the original name.

Kernels are handled in one layout whatever the conv type: (C_out, C_in/groups, k...)
(:func:`oi_kernel`); a transposed conv stores (C_in, C_out/groups, k...) and is converted
at the edges (:func:`module_kernel`), so the decompositions see one channel mapping.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .trace import is_plain_conv

__all__ = ["CONV_FUNCTIONS", "ConvGeometry", "Site", "SkippedLayer", "find_sites", "get_submodule_or_none",
           "module_kernel", "oi_kernel", "set_submodule", "swap_channel_modes"]

#: Functional convs the graph may call: target -> (spatial dims, transposed).
CONV_FUNCTIONS: dict[Any, tuple[int, bool]] = {
    F.conv1d: (1, False), torch.conv1d: (1, False), F.conv2d: (2, False), torch.conv2d: (2, False),
    F.conv3d: (3, False), torch.conv3d: (3, False),
    F.conv_transpose1d: (1, True), torch.conv_transpose1d: (1, True),
    F.conv_transpose2d: (2, True), torch.conv_transpose2d: (2, True),
    F.conv_transpose3d: (3, True), torch.conv_transpose3d: (3, True),
}


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    """``v`` (an int or a sequence of ints) as an n-tuple, as torch's conv modules read it."""
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(i) for i in v)
    return t * n if len(t) == 1 else t


@dataclass(frozen=True)
class ConvGeometry:
    """Everything needed to rebuild a conv (1-3 d, plain or transposed) or a Linear without its weights.

    The spatial rank is ``len(kernel_size)``. ``transposed`` and ``output_padding`` were
    added for transposed convs; their defaults (``False``, ``()``) describe every other
    layer, so the dicts of files written before them load unchanged.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    bias: bool = False
    linear: bool = False
    transposed: bool = False
    output_padding: tuple[int, ...] = ()  # transposed convs only

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd) -> "ConvGeometry":
        n = len(conv.kernel_size)
        pad = conv.padding if isinstance(conv.padding, str) else _ntuple(conv.padding, n)
        return cls(conv.in_channels, conv.out_channels, _ntuple(conv.kernel_size, n), _ntuple(conv.stride, n),
                   pad, _ntuple(conv.dilation, n), conv.groups, conv.padding_mode, conv.bias is not None,
                   transposed=bool(conv.transposed),
                   output_padding=_ntuple(conv.output_padding, n) if conv.transposed else ())

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "ConvGeometry":
        return cls(lin.in_features, lin.out_features, bias=lin.bias is not None, linear=True)

    @property
    def spatial(self) -> int:
        """Number of spatial dimensions (2 for a Linear, which never uses them)."""
        return len(self.kernel_size)

    @property
    def is_pointwise(self) -> bool:
        return self.linear or all(k == 1 for k in self.kernel_size)

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def is_conv2d(self) -> bool:
        """A plain (not transposed) 2-d conv: what passes written for ``nn.Conv2d`` alone may take."""
        return not self.linear and not self.transposed and self.spatial == 2

    def to_dict(self) -> dict[str, Any]:
        """Plain types only; the transposed-conv fields appear only for transposed convs, so a
        2-d conv's dict is what convfx wrote before they existed."""
        d = asdict(self)
        for k in ("kernel_size", "stride", "dilation", "output_padding"):
            d[k] = list(d[k])
        if not isinstance(self.padding, str):
            d["padding"] = list(self.padding)
        if not self.transposed:
            del d["transposed"], d["output_padding"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConvGeometry":
        d = dict(d)
        for k in ("kernel_size", "stride", "dilation", "output_padding"):
            if k in d:
                d[k] = tuple(d[k])
        if not isinstance(d["padding"], str):
            d["padding"] = tuple(d["padding"])
        return cls(**d)


def swap_channel_modes(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """(A, B, k...) → (B·groups, A/groups, k...), group by group: a plain conv's kernel layout to
    a transposed conv's and back (the map is its own inverse)."""
    a, b, *k = w.shape
    return w.reshape(groups, a // groups, b, *k).transpose(1, 2).reshape(groups * b, a // groups, *k)


def oi_kernel(weight: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``weight`` in the (C_out, C_in/groups, k...) layout of a plain conv.

    Why: a transposed conv stores (C_in, C_out/groups, k...), yet maps channels the same
    way (y[o] = Σ_i x[i] ⋆ W[i, o]); in this layout every decomposition treats both alike.
    """
    return swap_channel_modes(weight, geom.groups) if geom.transposed else weight


#: The inverse of :func:`oi_kernel` (the layout the layer described by ``geom`` stores) is
#: the same map: swapping the channel modes twice restores them.
module_kernel = oi_kernel


@dataclass
class Site:
    """One factorizable layer: its owner's qualified name and every node that calls it."""

    fqn: str
    kind: str  # "module" | "function" | "linear"
    geometry: ConvGeometry
    weight: torch.Tensor
    bias: torch.Tensor | None
    nodes: list[fx.Node] = field(default_factory=list)
    # get_attr nodes elsewhere in the graph that read only the weight's/bias's dtype or
    # device (e.g. ``x.to(self.conv.weight.dtype)``); the rewrite points them at a factor.
    meta_reads: list[fx.Node] = field(default_factory=list)


@dataclass
class SkippedLayer:
    """A conv (or selected layer) that is left as it is, with the reason why."""

    fqn: str
    reason: str
    kind: str = "conv"


def get_submodule_or_none(root: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return root.get_submodule(fqn)
    except AttributeError:
        return None


def set_submodule(root: nn.Module, fqn: str, module: nn.Module) -> None:
    """Replace (or create) the submodule at ``fqn``."""
    parent_name, _, name = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)


def _conv_call_args(node: fx.Node, transposed: bool) -> dict[str, Any]:
    names = (["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"] if transposed
             else ["input", "weight", "bias", "stride", "padding", "dilation", "groups"])
    defaults: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                                "output_padding": 0}
    out = dict(defaults)
    out.update(dict(zip(names, node.args)))
    out.update(node.kwargs)
    return out


def _attr_owner(target: str, attr: str) -> str | None:
    if target == attr:
        return ""
    suffix = "." + attr
    return target[: -len(suffix)] if target.endswith(suffix) else None


_META_ATTRS = frozenset({"dtype", "device", "is_cuda"})


def _metadata_only(attr_node: fx.Node, besides: fx.Node | None = None) -> bool:
    """Whether every user of ``attr_node`` (other than ``besides``) only reads its dtype/device."""
    return all(u is besides or (u.op == "call_function" and u.target is getattr and len(u.args) == 2
                                and u.args[1] in _META_ATTRS) for u in attr_node.users)


def _computed_weight_owner(w: fx.Node) -> str | None:
    """The module whose ``weight`` parameter a computed conv weight is derived from, if any."""
    todo, seen = [w], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            owner = _attr_owner(str(n.target), "weight")
            if owner:
                return owner
        todo.extend(n.all_input_nodes)
    return None


def _function_site(gm: fx.GraphModule, node: fx.Node) -> Site | SkippedLayer:
    n, transposed = CONV_FUNCTIONS[node.target]
    a = _conv_call_args(node, transposed)
    w = a["weight"]
    label = f"{node.name} (functional {getattr(node.target, '__name__', 'conv')})"
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        owner = _computed_weight_owner(w) if isinstance(w, fx.Node) else None
        return SkippedLayer(owner or label, "weight is computed in forward (e.g. standardized) from the "
                            "parameter, not used as it is" if owner else
                            "weight is computed in the graph, not a module parameter")
    owner = _attr_owner(str(w.target), "weight")
    if owner is None or owner == "":
        return SkippedLayer(label, f"weight attribute {w.target!r} is not a module's 'weight'")
    b = a["bias"]
    bias: torch.Tensor | None = None
    if b is not None:
        if not (isinstance(b, fx.Node) and b.op == "get_attr" and _attr_owner(str(b.target), "bias") == owner):
            return SkippedLayer(owner, "bias is not the same module's 'bias' parameter")
        bias = getattr(gm.get_submodule(owner), "bias")
    meta_reads = []
    for attr_node in [w] + ([b] if isinstance(b, fx.Node) else []):
        if not _metadata_only(attr_node, besides=node):
            return SkippedLayer(owner, f"{attr_node.target!r} is also used outside the convolution")
        if len(attr_node.users) > 1:
            meta_reads.append(attr_node)
    dynamic = [k for k in ("stride", "padding", "dilation", "groups", "output_padding")
               if isinstance(a[k], fx.Node) or (isinstance(a[k], (list, tuple)) and
                                                any(isinstance(v, fx.Node) for v in a[k]))]
    if dynamic:
        return SkippedLayer(owner, f"conv argument(s) {', '.join(dynamic)} computed at run time")
    weight = getattr(gm.get_submodule(owner), "weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != n + 2:
        return SkippedLayer(owner, f"functional conv weight is not a {n + 2}-d tensor")
    groups = int(a["groups"])
    c_in, c_out = ((weight.shape[0], weight.shape[1] * groups) if transposed
                   else (weight.shape[1] * groups, weight.shape[0]))
    pad = a["padding"] if isinstance(a["padding"], str) else _ntuple(a["padding"], n)
    geom = ConvGeometry(c_in, c_out, tuple(weight.shape[2:]), _ntuple(a["stride"], n), pad,
                        _ntuple(a["dilation"], n), groups, "zeros", bias is not None, transposed=transposed,
                        output_padding=_ntuple(a["output_padding"], n) if transposed else ())
    return Site(owner, "function", geom, weight, bias, [node], meta_reads)


def _module_site(mod: nn.modules.conv._ConvNd, fqn: str, node: fx.Node) -> Site | SkippedLayer | None:
    """The site of a ``call_module`` on a conv, or why it is left alone.

    A conv subclass with its own ``forward`` is a leaf only when it could not be traced;
    the pipeline reports it with that reason, so it is no site here (None).
    """
    if not is_plain_conv(mod):
        return None
    if mod.transposed and (len(node.args) > 1 or node.kwargs.get("output_size") is not None):
        return SkippedLayer(fqn, "transposed conv called with output_size (its output padding is chosen at "
                                 "run time, which the factors would not repeat)")
    return Site(fqn, "module", ConvGeometry.from_conv(mod), mod.weight, mod.bias, [node])


def find_sites(gm: fx.GraphModule, *, include_linear: bool = True) -> tuple[list[Site], list[SkippedLayer]]:
    """Every conv (and Linear) call in ``gm``, grouped by owning module. Read-only.

    Convs that cannot be expressed as a :class:`Site` (computed weights, a transposed conv
    given ``output_size``) are returned as :class:`SkippedLayer` with a reason.
    """
    sites: dict[str, Site] = {}
    skipped: list[SkippedLayer] = []
    for node in gm.graph.nodes:
        found: Site | SkippedLayer | None = None
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            fqn = str(node.target)
            if isinstance(mod, nn.modules.conv._ConvNd):
                found = _module_site(mod, fqn, node)
            elif include_linear and type(mod) is nn.Linear:
                found = Site(fqn, "linear", ConvGeometry.from_linear(mod), mod.weight, mod.bias, [node])
        elif node.op == "call_function" and node.target in CONV_FUNCTIONS:
            found = _function_site(gm, node)
        if found is None:
            continue
        if isinstance(found, SkippedLayer):
            if all(s.fqn != found.fqn for s in skipped):
                skipped.append(found)
            sites.pop(found.fqn, None)  # one call it cannot take is enough to leave the layer alone
            continue
        if any(s.fqn == found.fqn for s in skipped):
            continue
        prev = sites.get(found.fqn)
        if prev is None:
            sites[found.fqn] = found
        elif prev.geometry == found.geometry and prev.weight is found.weight:
            prev.nodes.extend(found.nodes)
        else:
            del sites[found.fqn]
            skipped.append(SkippedLayer(found.fqn, "called more than once with different conv arguments"))
    _check_parameter_reads(gm, sites, skipped)
    return list(sites.values()), skipped


def _check_parameter_reads(gm: fx.GraphModule, sites: dict[str, Site], skipped: list[SkippedLayer]) -> None:
    """Module sites whose weight/bias other nodes read: keep dtype/device reads, skip the rest.

    The rewrite removes the original parameters, so any other read would dangle.
    """
    reads: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            owner, _, attr = str(n.target).rpartition(".")
            if attr in ("weight", "bias") and owner in sites and sites[owner].kind != "function":
                reads.setdefault(owner, []).append(n)
    for fqn, nodes in reads.items():
        if all(_metadata_only(n) for n in nodes):
            sites[fqn].meta_reads.extend(nodes)
        else:
            del sites[fqn]
            users = sorted({u.name for n in nodes for u in n.users})
            skipped.append(SkippedLayer(fqn, f"its weight/bias is also read by other graph nodes "
                                             f"({', '.join(users[:4])}); factorizing would break them"))
