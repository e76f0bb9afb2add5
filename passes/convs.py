"""Find factorizable layers in a traced graph, whichever way they are called.

A convolution reaches the graph either as a ``call_module`` on a plain ``nn.Conv2d`` or,
when a Conv2d subclass overrides ``forward``, as a ``call_function`` ``conv2d`` whose
weight (and bias) are ``get_attr`` nodes. Both are described by one :class:`Site`, keyed
by the qualified name of the module that owns the weight, so that a module called twice
is factorized once and the factors keep the original name.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .trace import is_plain_conv

__all__ = ["ConvGeometry", "Site", "SkippedLayer", "find_sites", "get_submodule_or_none", "set_submodule"]

_CONV2D_FNS = {F.conv2d, torch.conv2d}


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


@dataclass(frozen=True)
class ConvGeometry:
    """Everything needed to rebuild a Conv2d (or Linear) without its weights."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    bias: bool = False
    linear: bool = False

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "ConvGeometry":
        pad = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        return cls(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride),
                   pad, _pair(conv.dilation), conv.groups, conv.padding_mode, conv.bias is not None)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "ConvGeometry":
        return cls(lin.in_features, lin.out_features, bias=lin.bias is not None, linear=True)

    @property
    def is_pointwise(self) -> bool:
        return self.linear or self.kernel_size == (1, 1)

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("kernel_size", "stride", "dilation"):
            d[k] = list(d[k])
        if not isinstance(self.padding, str):
            d["padding"] = list(self.padding)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConvGeometry":
        d = dict(d)
        for k in ("kernel_size", "stride", "dilation"):
            d[k] = tuple(d[k])
        if not isinstance(d["padding"], str):
            d["padding"] = tuple(d["padding"])
        return cls(**d)


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


def _conv_call_args(node: fx.Node) -> dict[str, Any]:
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    defaults: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
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
    a = _conv_call_args(node)
    w = a["weight"]
    label = f"{node.name} (functional conv2d)"
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
    weight = getattr(gm.get_submodule(owner), "weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return SkippedLayer(owner, "functional conv weight is not a 4-d tensor")
    c_out, c_in_g, kh, kw = weight.shape
    groups = int(a["groups"])
    pad = a["padding"] if isinstance(a["padding"], str) else _pair(a["padding"])
    geom = ConvGeometry(c_in_g * groups, c_out, (kh, kw), _pair(a["stride"]), pad, _pair(a["dilation"]),
                        groups, "zeros", bias is not None)
    return Site(owner, "function", geom, weight, bias, [node], meta_reads)


def find_sites(gm: fx.GraphModule, *, include_linear: bool = True) -> tuple[list[Site], list[SkippedLayer]]:
    """Every conv (and Linear) call in ``gm``, grouped by owning module. Read-only.

    Convs that cannot be expressed as a :class:`Site` (computed weights, non-2d convs,
    transposed convs) are returned as :class:`SkippedLayer` with a reason.
    """
    sites: dict[str, Site] = {}
    skipped: list[SkippedLayer] = []
    for node in gm.graph.nodes:
        found: Site | SkippedLayer | None = None
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            fqn = str(node.target)
            if isinstance(mod, nn.Conv2d) and is_plain_conv(mod):
                found = Site(fqn, "module", ConvGeometry.from_conv(mod), mod.weight, mod.bias, [node])
            elif isinstance(mod, (nn.Conv1d, nn.Conv3d)):
                found = SkippedLayer(fqn, f"{type(mod).__name__} is not supported (only 2-d convs)")
            elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
                found = SkippedLayer(fqn, f"{type(mod).__name__} (transposed conv) is not supported")
            elif include_linear and type(mod) is nn.Linear:
                found = Site(fqn, "linear", ConvGeometry.from_linear(mod), mod.weight, mod.bias, [node])
        elif node.op == "call_function" and node.target in _CONV2D_FNS:
            found = _function_site(gm, node)
        if found is None:
            continue
        if isinstance(found, SkippedLayer):
            if all(s.fqn != found.fqn for s in skipped):
                skipped.append(found)
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
