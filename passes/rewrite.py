"""The factorize rewrite: the only pass that mutates the graph.

Each planned site's owning module is replaced by a :class:`~passes.factors.Factorized`
container holding the factors under the original name (``<fqn>.0``, ``<fqn>.1``, …), and
each call of the conv becomes a chain of ``call_module`` nodes on those factors. Functional
convs lose their ``get_attr`` weight/bias nodes; anything else the original module owned
(a padding module, extra buffers) moves into the container so the graph still finds it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Collection

import torch
import torch.fx as fx
from torch import Tensor

from .convs import Site, get_submodule_or_none, set_submodule
from .factors import Factorized, FactorPlan, build_factor_modules, module_weights

__all__ = ["WeightFn", "factorize_sites", "FactorizedSite"]

log = logging.getLogger(__name__)

# Given a site and its plan, return one weight per factor (the last factor takes the bias).
WeightFn = Callable[[Site, FactorPlan], list[Tensor]]


@dataclass
class FactorizedSite:
    fqn: str
    container: Factorized
    new_nodes: list[list[fx.Node]]


def _build_container(gm: fx.GraphModule, site: Site, plan: FactorPlan, weights: list[Tensor] | None,
                     fold_square: bool) -> Factorized:
    w = site.weight
    factors = build_factor_modules(site.geometry, plan, dtype=w.dtype, device=w.device, fold_square=fold_square)
    if weights is not None:
        weights = module_weights(site.geometry, plan, weights, fold_square)
        if len(weights) != len(factors):
            raise RuntimeError(f"{site.fqn}: got {len(weights)} factor weights for {len(factors)} factors")
        with torch.no_grad():
            for f, fw in zip(factors, weights):
                if tuple(f.weight.shape) != tuple(fw.shape):  # type: ignore[union-attr]
                    raise RuntimeError(f"{site.fqn}: factor weight shape {tuple(fw.shape)} != "
                                       f"{tuple(f.weight.shape)}")  # type: ignore[union-attr]
                f.weight.copy_(fw)  # type: ignore[union-attr,operator]
            if site.bias is not None:
                factors[-1].bias.copy_(site.bias)  # type: ignore[union-attr,operator]
    original = get_submodule_or_none(gm, site.fqn)
    container = Factorized(factors, plan, site.geometry, fold_square)
    container.train(original.training if original is not None else gm.training)
    if original is not None and site.kind == "function":
        # Keep what the traced-into subclass still uses (e.g. its padding module).
        for name, child in original.named_children():
            if name not in container._modules:
                container.add_module(name, child)
        for name, p in original.named_parameters(recurse=False):
            if name not in ("weight", "bias"):
                container.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            container.register_buffer(name, b)
    return container


def factorize_sites(gm: fx.GraphModule, sites: list[Site], plans: dict[str, FactorPlan],
                    weight_fn: WeightFn | None, unfolded: Collection[str] = ()) -> list[FactorizedSite]:
    """Swap every site that has a plan for its factor chain, then lint and recompile.

    ``weight_fn`` supplies the method's full factor chain (tucker: three weights; square
    factors are folded here, see :func:`passes.factors.tucker_keeps`); ``None`` leaves the
    weights at their initial values (used when loading a saved model whose weights come
    from a state dict; layers named in ``unfolded`` get the layout of version-1 files).
    """
    done: list[FactorizedSite] = []
    graph = gm.graph
    for site in sites:
        plan = plans.get(site.fqn)
        if plan is None:
            continue
        weights = weight_fn(site, plan) if weight_fn is not None else None
        container = _build_container(gm, site, plan, weights, site.fqn not in unfolded)
        set_submodule(gm, site.fqn, container)
        chains: list[list[fx.Node]] = []
        for node in site.nodes:
            x = node.args[0] if node.args else node.kwargs["input"]
            chain: list[fx.Node] = []
            with graph.inserting_before(node):
                for i in range(container.n_factors):
                    x = graph.call_module(f"{site.fqn}.{i}", (x,))
                    chain.append(x)
            node.replace_all_uses_with(x)
            attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
            graph.erase_node(node)
            for a in attrs:
                if not a.users:
                    graph.erase_node(a)
            chains.append(chain)
        for a in site.meta_reads:  # dtype/device reads: the first factor has the same ones
            if a.graph is graph and a.users:
                a.target = f"{site.fqn}.0.weight"
        done.append(FactorizedSite(site.fqn, container, chains))
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return done

