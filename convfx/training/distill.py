"""Distillation from the uncompressed model: on the logits, and on intermediate outputs."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from passes.errors import ConvfxError

from .common import unwrap

__all__ = [
    "FeatureTap",
    "default_feature_layers",
    "distillation_loss",
    "feature_distillation_loss",
    "resolve_feature_layers",
]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The KL term is averaged over the batch; the ``T^2`` factor keeps its gradient scale
    independent of the temperature (Hinton et al.).
    """
    t = float(temperature)
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    ce = F.cross_entropy(student_logits, targets)
    return alpha * t * t * kd + (1.0 - alpha) * ce


def feature_distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``||s - t||^2 / ||t||^2``: each layer's relative output error.

    Relative, so that a layer's weight does not depend on its activation scale (a BN
    output with large gamma would otherwise dominate).  The teacher side carries no grad.
    """
    if len(student) != len(teacher) or not student:
        raise ConvfxError(f"feature distillation got {len(student)} student and {len(teacher)} teacher "
                          "outputs; a hooked module ran a different number of times", where="finetune")
    terms = [
        (s.float() - t.detach().float()).pow(2).sum() / t.detach().float().pow(2).sum().clamp_min(1e-12)
        for s, t in zip(student, teacher)
    ]
    return torch.stack(terms).mean()


def default_feature_layers(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Names of the BatchNorm modules present in both models: the points feature distillation matches.

    Why BN outputs: a factorized conv keeps its BN and its output shape, the BN is a leaf
    module in an fx graph too (blocks are inlined there, so block-level hooks would never
    fire), and it sits at every conv's output.
    """
    t_names = {n for n, m in teacher.named_modules() if isinstance(m, _BatchNorm)}
    return [n for n, m in unwrap(student).named_modules() if isinstance(m, _BatchNorm) and n in t_names]


def resolve_feature_layers(student: nn.Module, teacher: nn.Module, names: Sequence[str] | None) -> list[str]:
    """The layers feature distillation matches: ``names``, or by default every shared BatchNorm."""
    layers = default_feature_layers(student, teacher) if names is None else list(names)
    if not layers:
        raise ConvfxError("feature_kd > 0 but there are no feature layers to match (the default "
                          "is every BatchNorm both models share)", where="finetune",
                          hint="pass feature_layers=[module names]")
    return layers


class FeatureTap:
    """Forward hooks that collect the outputs of the same named modules in student and teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: list[str]) -> None:
        self.names = names
        self.out: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
        self.active = False  # only the training forward passes record (not eval or BN passes)
        found = self._resolve(student, teacher, names)  # all resolved before any hook goes in
        self.handles = [mod.register_forward_hook(self._hook(side)) for side, mod in found]

    @staticmethod
    def _resolve(student: nn.Module, teacher: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
        found: list[tuple[str, nn.Module]] = []
        for side, model in (("s", unwrap(student)), ("t", teacher)):
            for name in names:
                try:
                    found.append((side, model.get_submodule(name)))
                except AttributeError as exc:
                    who = "student" if side == "s" else "teacher"
                    raise ConvfxError(f"feature_layers names {name!r}, which the {who} does not have",
                                      where="finetune") from exc
        return found

    def _hook(self, side: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            if self.active:
                self.out[side].append(output)
        return hook

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The outputs recorded since the last call, checked to pair up by shape."""
        s, t = self.out["s"], self.out["t"]
        self.out = {"s": [], "t": []}
        for name, a, b in zip(self.names, s, t):
            if a.shape != b.shape:
                raise ConvfxError(f"feature layer {name!r}: student output {tuple(a.shape)} vs teacher "
                                  f"{tuple(b.shape)}", where="finetune",
                                  hint="name layers whose outputs keep their shape after compression")
        return s, t

    def close(self) -> None:
        """Remove the hooks (the user's models must not keep them after ``finetune``)."""
        for h in self.handles:
            h.remove()
