"""Save and load compressed models without pickling code and without re-decomposing.

Why: a compressed model is a ``torch.fx.GraphModule`` whose class is generated at run
time, so ``torch.save(gm)`` would pickle code (and ``weights_only=True`` loading would
rightly refuse it). A factorization is, however, fully described by the architecture
it came from plus, per factorized layer, a :class:`~passes.factors.FactorPlan` and a
:class:`~passes.convs.ConvGeometry`. That description and the state dict are all a file
needs; :func:`load` rebuilds the structure (trace → find sites → factorize with
``weight_fn=None``, no decomposition) and loads the weights strictly.

File layout (one ``torch.save``'d dict, readable with ``torch.load(path, weights_only=True)``;
only tensors and plain Python types)::

    {"format": "convfx.model", "version": 2, "convfx_version": "0.1.0",
     "arch": "cifar_resnet20" | None,          # registry name (convfx.zoo.build)
     "normalization": {"mean": [...], "std": [...]} | None,
     "input_shapes": [[1, 3, 32, 32]],         # example input(s) the report was computed for
     "training": bool,                         # top-level train/eval mode
     "layers": {fqn: {"method": "tucker", "ranks": [r_out, r_in],
                      "kind": "conv" | "linear", "geometry": ConvGeometry.to_dict(),
                      "fold_square": bool}},  # version 2; version-1 files never fold
     "widths": {last_fqn: k},                  # method="id": hidden width of each narrowed chain
     "report": "<Report as JSON>" | None,
     "state_dict": {name: tensor},
     "parts": {"root": str, "parts": [{"path": str, "calls": [{"in": spec, "out": spec}]}],
               "untraced": {path: str}}}      # version 3, only for a model whose root cannot be traced

A model whose root ``forward`` cannot be traced (:mod:`passes.parts`) is saved with its
parts: their paths and each recorded call's argument structure (plain values). :func:`load`
traces the same parts of the uncompressed model the same way (nothing is run), rebuilds
the layers in that graph and puts them into the model itself, which it returns (an
``nn.Module``, as ``compress`` did). Such files are version 3; others stay version 2.

The architecture name is taken from ``arch=``, else from a ``convfx_arch`` attribute on
the model (see :func:`convfx.zoo.tag_model`; ``compress`` returns a new GraphModule
without it, so pass ``arch=`` or tag the result). Without a known name, :func:`load`
needs the uncompressed model itself (``model=``), e.g. an instance of a custom class.

Fine-tuned weights travel separately as a plain state dict (:func:`save_state_dict`),
applied with ``load(path, state_dict=...)`` or :func:`load_state_dict`.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from passes.convs import ConvGeometry, find_sites
from passes.errors import UNKNOWN_ARCH, ConvfxError
from passes.factors import Factorized, FactorPlan
from passes.interp import find_chains
from passes.narrow import narrow_chains
from passes.parts import install, replay_graph
from passes.rewrite import factorize_sites
from passes.trace import trace

from . import zoo
from .checkpoint import atomic_save, load_checkpoint, load_state_dict_strict
from .parts import PARTS_ATTR
from .report import Report

__all__ = [
    "FORMAT",
    "VERSION",
    "save",
    "load",
    "read_spec",
    "save_state_dict",
    "load_state_dict",
]

log = logging.getLogger(__name__)

#: Value of the ``"format"`` key that marks a convfx model file.
FORMAT = "convfx.model"
#: Layout version written by :func:`save`. Version 2 folds full-rank tucker factors into the
#: core (:func:`passes.factors.tucker_keeps`); :func:`load` also reads version 1 files.
VERSION = 2
#: Layout version of a file that records the parts of a model whose root cannot be traced.
PARTS_VERSION = 3
_READABLE = (1, 2, 3)

_FINETUNE_FORMAT = "convfx.finetune/1"  # see convfx.train (its resumable checkpoints)

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------- helpers
def _factorized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The spec of every :class:`Factorized` container in ``model``, keyed by its fqn."""
    layers: dict[str, dict[str, Any]] = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, Factorized):
            geom: ConvGeometry = mod.geometry
            layers[fqn] = {
                "method": mod.plan.method,
                "ranks": [int(r) for r in mod.plan.ranks],
                # Whether the conv was a module call or a functional call is re-derived
                # from the rebuilt architecture; the geometry check catches mismatches.
                "kind": "linear" if geom.linear else "conv",
                "geometry": geom.to_dict(),
                # False only for a model loaded from a version-1 file (unfolded tucker layout).
                "fold_square": mod.fold_square,
            }
    return layers


def _normalization_dict(model: nn.Module, given: zoo.Normalization | None) -> dict[str, list[float]] | None:
    norm = given if given is not None else getattr(model, "convfx_normalization", None)
    if isinstance(norm, zoo.Normalization):
        return {"mean": list(norm.mean), "std": list(norm.std)}
    return None


# -------------------------------------------------------------------------------- save
def save(gm: nn.Module, path: PathLike, *, arch: str | None = None,
         normalization: zoo.Normalization | None = None) -> Path:
    """Write ``gm`` (typically ``compress``'s result) to ``path`` atomically; return the path.

    ``arch`` is the registry name of the uncompressed architecture (default: the
    model's ``convfx_arch`` attribute). Files saved without one are loaded with
    ``load(path, model=<uncompressed instance>)``.
    """
    if not isinstance(gm, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(gm).__name__}")
    if arch is None:
        arch = zoo.arch_name(gm)
    elif not isinstance(arch, str) or not arch:
        raise ValueError(f"arch: expected a non-empty string, got {arch!r}")
    if arch is not None and not zoo.is_known_arch(arch):
        log.info("arch %r is not a registry name; load() will need model=", arch)
    layers = _factorized_layers(gm)
    report = getattr(gm, "convfx_report", None)
    widths = dict(report.widths) if isinstance(report, Report) else {}
    if not layers and not widths:
        log.warning("%s has no factorized layers; saving it as it is", type(gm).__name__)
    state = {k: v.detach().cpu() for k, v in gm.state_dict().items()}
    parts = getattr(gm, PARTS_ATTR, None)
    obj: dict[str, Any] = {
        "format": FORMAT,
        "version": PARTS_VERSION if parts else VERSION,
        "convfx_version": _convfx_version(),
        "arch": arch,
        "normalization": _normalization_dict(gm, normalization),
        "input_shapes": [list(map(int, s)) for s in report.input_shapes] if isinstance(report, Report) else None,
        "training": bool(gm.training),
        "layers": layers,
        "widths": widths,
        "report": report.to_json(indent=None) if isinstance(report, Report) else None,
        "state_dict": state,
    }
    if parts:
        obj["parts"] = parts
    out = Path(path)
    atomic_save(obj, out)
    log.info("saved %s (%d factorized layers, arch=%s) to %s", type(gm).__name__, len(layers), arch, out)
    return out


def _convfx_version() -> str:
    from . import __version__

    return str(__version__)


# -------------------------------------------------------------------------------- load
def _check_spec(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        fmt = obj.get("format") if isinstance(obj, dict) else None
        hint = "save compressed models with convfx.save(gm, path)"
        if fmt == _FINETUNE_FORMAT or (isinstance(obj, dict) and "format" not in obj):
            hint = ("this looks like a state dict or a fine-tuning checkpoint; apply it to a loaded "
                    "model with convfx.load(model_file, state_dict=this_file)")
        raise ConvfxError(f"not a convfx model file (format {fmt!r})", where=where, hint=hint)
    version = obj.get("version")
    if version not in _READABLE:
        raise ConvfxError(f"unsupported convfx model file version {version!r} (this convfx reads "
                          f"{', '.join(map(str, _READABLE))})",
                          where=where, hint="load it with the convfx version that wrote it")
    for key, typ in (("layers", dict), ("state_dict", dict)):
        if not isinstance(obj.get(key), typ):
            raise ConvfxError(f"malformed convfx model file: {key!r} is missing or not a {typ.__name__}",
                              where=where)
    return obj


def read_spec(path: PathLike) -> dict[str, Any]:
    """The file's contents (safely loaded and validated) without building any model."""
    p = Path(path)
    return _check_spec(load_checkpoint(p, map_location="cpu"), str(p))


def _plans(spec: dict[str, Any], where: str) -> tuple[dict[str, FactorPlan], dict[str, ConvGeometry],
                                                      dict[str, str], dict[str, bool]]:
    plans: dict[str, FactorPlan] = {}
    geoms: dict[str, ConvGeometry] = {}
    kinds: dict[str, str] = {}
    folds: dict[str, bool] = {}
    for fqn, entry in spec["layers"].items():
        try:
            plans[fqn] = FactorPlan(str(entry["method"]), tuple(int(r) for r in entry["ranks"]))
            geoms[fqn] = ConvGeometry.from_dict(entry["geometry"])
            kinds[fqn] = str(entry.get("kind", "conv"))
            folds[fqn] = bool(entry.get("fold_square", spec["version"] >= 2))  # version 1: never folded
        except (KeyError, TypeError, ValueError) as exc:
            raise ConvfxError(f"malformed entry for layer {fqn!r}: {exc}", where=where) from exc
    return plans, geoms, kinds, folds


def _base_model(spec: dict[str, Any], model: nn.Module | None, where: str) -> nn.Module:
    arch = spec.get("arch")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
        given = zoo.arch_name(model)
        if arch and given and given != arch:
            raise ConvfxError(f"the file was saved from {arch!r} but model= is a {given!r}", where=where,
                              hint=f"pass a {arch} instance, or model=None to build it by name")
        # The rewrite swaps submodules in place; never touch the caller's instance.
        return copy.deepcopy(model)
    if not arch:
        raise ConvfxError(
            "the file does not name its architecture, so it cannot be rebuilt by itself", where=where,
            hint="pass the uncompressed model: convfx.load(path, model=MyNet()) "
                 "(or save with convfx.save(gm, path, arch=...))", kind=UNKNOWN_ARCH)
    if not zoo.is_known_arch(arch):
        raise ConvfxError(f"architecture {arch!r} is not in the convfx registry", where=where,
                          hint=f"pass an uncompressed {arch} instance: convfx.load(path, model=...)",
                          kind=UNKNOWN_ARCH)
    return zoo.build(arch)


def _float_dtypes(state: Mapping[str, Any]) -> set[torch.dtype]:
    return {v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _match_dtypes(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Give every floating parameter and buffer the dtype its saved tensor has.

    Why per tensor: a model may mix dtypes (one float64 layer in a float32 net), and
    loading copies values into the existing tensors, which keep their own dtype.
    """
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            saved = state.get(name)
            if isinstance(saved, torch.Tensor) and saved.is_floating_point() and t.is_floating_point() \
                    and t.dtype != saved.dtype:
                t.data = t.data.to(saved.dtype)


def _rebuild(base: nn.Module, spec: dict[str, Any], where: str) -> fx.GraphModule | nn.Module:
    """The compressed structure: a GraphModule, or ``base`` itself with its parts' layers replaced."""
    plans, geoms, kinds, folds = _plans(spec, where)
    dtypes = _float_dtypes(spec["state_dict"])
    if len(dtypes) == 1:  # one dtype: everything, unsaved buffers included, takes it
        base = base.to(dtypes.pop())
    parts = spec.get("parts")
    originals = {id(m) for m in base.modules()}
    gm = replay_graph(base, parts, where) if parts else trace(base).gm
    sites, _ = find_sites(gm)
    by_fqn = {s.fqn: s for s in sites}
    missing = [f for f in plans if f not in by_fqn]
    if missing:
        raise ConvfxError(
            f"{len(missing)} factorized layer(s) of the file are not convolutions of this model: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
            where=where, hint="the model is a different architecture from the one the file was saved from")
    for fqn, geom in geoms.items():
        site = by_fqn[fqn]
        kind_ok = kinds[fqn] == site.kind or (kinds[fqn] == "conv" and site.kind in ("module", "function"))
        if site.geometry != geom or not kind_ok:
            raise ConvfxError(
                f"layer geometry differs: file has {kinds[fqn]} {geom}, model has {site.kind} {site.geometry}",
                where=f"{where}: {fqn}", hint="the model is a different architecture (or variant) "
                "from the one the file was saved from")
    widths = {str(f): int(k) for f, k in (spec.get("widths") or {}).items()}
    chains = {c.name: c for c in find_chains(gm, sites)}
    for fqn, k in widths.items():
        if fqn not in chains or not 0 < k <= chains[fqn].hidden:
            raise ConvfxError(f"narrowed chain {fqn!r} (width {k}) is not a chain of this model",
                              where=where, hint="the model is a different architecture from the one the file "
                              "was saved from")
    # The code path that narrowed them, with placeholder weights that the state dict replaces.
    narrow_chains(gm, list(chains.values()), widths)
    factorize_sites(gm, [by_fqn[f] for f in plans], plans, weight_fn=None,
                    unfolded={f for f, fold in folds.items() if not fold})
    model: nn.Module = gm
    if parts:
        install(gm, base, originals)
        setattr(base, PARTS_ATTR, parts)
        model = base
    _match_dtypes(model, spec["state_dict"])
    return model


def _state_dict_from(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """Accept a plain state dict, a convfx model file or a fine-tuning checkpoint."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj.get("state_dict")
    elif isinstance(obj, dict) and obj.get("format") == _FINETUNE_FORMAT:
        obj = obj.get("model")
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConvfxError("does not hold a state dict (a mapping of names to tensors)", where=where)
    return dict(obj)


def load_state_dict(model: nn.Module, source: PathLike | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load weights into ``model`` strictly and return it.

    ``source`` is a state-dict file (e.g. from :func:`save_state_dict`), a fine-tuning
    checkpoint (``last.pt``), a convfx model file, or an in-memory state dict. Every key
    that does not fit is listed in one :class:`ConvfxError`.
    """
    if isinstance(source, Mapping):
        where = "<state dict>"
        state = _state_dict_from(source, where)
    else:
        where = str(source)
        state = _state_dict_from(load_checkpoint(source, map_location="cpu"), where)
    load_state_dict_strict(model, state, where=where)
    return model


def load(path: PathLike, model: nn.Module | None = None, *,
         state_dict: PathLike | Mapping[str, torch.Tensor] | None = None) -> fx.GraphModule | nn.Module:
    """Rebuild a model saved by :func:`save`; no decomposition is run.

    A GraphModule, or for a model whose root cannot be traced (a version-3 file) the
    uncompressed model itself with its parts' layers rebuilt.

    The uncompressed architecture comes from the file's registry name, or from
    ``model`` (required when the file has no known name; an uncompressed instance, left
    untouched). ``state_dict`` optionally replaces the stored weights, e.g. with
    fine-tuned ones from :func:`save_state_dict`. The result carries ``convfx_report``
    (when stored), ``convfx_arch`` and ``convfx_normalization``, is on the CPU, and is
    trainable.
    """
    p = Path(path)
    where = str(p)
    spec = read_spec(p)
    base = _base_model(spec, model, where)
    gm = _rebuild(base, spec, where)
    load_state_dict_strict(gm, spec["state_dict"], where=where)
    if state_dict is not None:
        load_state_dict(gm, state_dict)
    gm.train(bool(spec.get("training", False)))

    arch = spec.get("arch") or zoo.arch_name(base)
    norm = spec.get("normalization")
    normalization = (zoo.Normalization(tuple(norm["mean"]), tuple(norm["std"])) if isinstance(norm, dict)
                     else getattr(base, "convfx_normalization", None))
    zoo.tag_model(gm, arch=arch, normalization=normalization if isinstance(normalization, zoo.Normalization)
                  else None)
    if isinstance(spec.get("report"), str):
        try:
            report = Report.from_json(spec["report"])
            # Files written before reports carried the widths keep them beside the report only.
            report.widths = {str(f): int(k) for f, k in (spec.get("widths") or {}).items()}
            gm.convfx_report = report  # type: ignore[assignment]
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: stored report could not be read (%s); continuing without it", where, exc)
    log.info("loaded %s from %s (%d factorized layers)", arch or type(base).__name__, where, len(spec["layers"]))
    return gm


def save_state_dict(model: nn.Module, path: PathLike) -> Path:
    """Write ``model``'s weights (CPU tensors only) atomically, e.g. after fine-tuning.

    The file pairs with the model file the structure came from:
    ``load(model_file, state_dict=path)``.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = Path(path)
    atomic_save(state, out)
    log.info("saved state dict (%d tensors) to %s", len(state), out)
    return out
