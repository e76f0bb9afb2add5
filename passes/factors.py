"""Factor structures: which small layers replace one conv, what they cost, their weights.

One :class:`FactorPlan` (method + ranks) plus a :class:`ConvGeometry` fully determines the
factor modules, so a saved model can be rebuilt without re-running any decomposition.

Structures (input on the left):

* ``tucker`` — 1x1 (C_in→r_in) · k_h×k_w core (r_in→r_out, original stride/padding/dilation
  and padding mode) · 1x1 (r_out→C_out, original bias). Kim et al. 2015. A factor at full
  channel rank (r_in = C_in or r_out = C_out) is a square 1x1 conv that costs MACs and time
  and removes nothing, so it is folded into the core (:func:`tucker_keeps`): (C_out, C_in)
  leaves one conv, (r_out, C_in) the svd-like pair k_h×k_w · 1x1.
* ``cp`` — 1x1 (C_in→R) · depthwise k_h×1 · depthwise 1×k_w · 1x1 (R→C_out, bias). The
  vertical conv takes the vertical stride/padding/dilation, the horizontal one the
  horizontal ones. Lebedev et al. 2015.
* ``svd`` — k_h×k_w conv (C_in→r, original geometry) · 1x1 (r→C_out, bias). For 1x1 convs
  this is the usual pair of 1x1 convs; for a Linear, two Linears.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .convs import ConvGeometry
from .decompose import relative_error, truncated_svd, tucker2

__all__ = [
    "FactorPlan", "METHODS", "build_factor_modules", "decompose_weights", "factor_cost",
    "original_cost", "max_ranks", "Factorized", "output_hw", "tucker_keeps", "module_weights",
]

METHODS = ("tucker", "cp", "svd")


@dataclass(frozen=True)
class FactorPlan:
    """The method and ranks chosen for one layer. ``ranks`` is (r_out, r_in) for tucker, (R,) else."""

    method: str
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        want = 2 if self.method == "tucker" else 1
        if len(self.ranks) != want or any(int(r) < 1 for r in self.ranks):
            raise ValueError(f"rank: {self.method} needs {want} positive rank(s), got {self.ranks}")


def max_ranks(geom: ConvGeometry, method: str) -> tuple[int, ...]:
    """The largest meaningful ranks (full rank for tucker/svd, the trivial CP bound for cp)."""
    kh, kw = geom.kernel_size
    if method == "tucker":
        return (geom.out_channels, geom.in_channels)
    if method == "svd":
        return (min(geom.out_channels, geom.in_channels * kh * kw),)
    dims = sorted([geom.out_channels, geom.in_channels, kh, kw])
    return (dims[0] * dims[1] * dims[2],)


def tucker_keeps(geom: ConvGeometry, plan: FactorPlan, fold_square: bool = True) -> tuple[bool, bool]:
    """Whether a tucker plan keeps its (input, output) 1x1 factor; ``(True, True)`` for other methods.

    Why: at full channel rank a factor is an invertible square 1x1 conv; folding it into
    the core gives the same function with fewer MACs and one layer less. ``fold_square=False``
    gives the unfolded layout that files of format version 1 were written with.
    """
    if plan.method != "tucker" or not fold_square:
        return True, True
    r_out, r_in = plan.ranks
    return r_in < geom.in_channels, r_out < geom.out_channels


def _conv(cin: int, cout: int, k: tuple[int, int], geom: ConvGeometry, *, stride: tuple[int, int] = (1, 1),
          padding: tuple[int, int] | str = (0, 0), dilation: tuple[int, int] = (1, 1), groups: int = 1,
          bias: bool = False, **factory: object) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias, padding_mode=geom.padding_mode, **factory)  # type: ignore[arg-type]


def build_factor_modules(geom: ConvGeometry, plan: FactorPlan, *, dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None, fold_square: bool = True) -> list[nn.Module]:
    """The factor layers for ``plan``, uninitialised (weights are filled in separately)."""
    fk = {"dtype": dtype, "device": device}
    cin, cout, k = geom.in_channels, geom.out_channels, geom.kernel_size
    if geom.linear:
        if plan.method != "svd":
            raise ValueError(f"method: Linear layers are factorized by 'svd', not {plan.method!r}")
        (r,) = plan.ranks
        return [nn.Linear(cin, r, bias=False, **fk), nn.Linear(r, cout, bias=geom.bias, **fk)]  # type: ignore[arg-type]
    if plan.method == "svd":
        (r,) = plan.ranks
        return [
            _conv(cin, r, k, geom, stride=geom.stride, padding=geom.padding, dilation=geom.dilation, **fk),
            _conv(r, cout, (1, 1), geom, bias=geom.bias, **fk),
        ]
    if plan.method == "tucker":
        r_out, r_in = plan.ranks
        keep_in, keep_out = tucker_keeps(geom, plan, fold_square)
        core_in, core_out = (r_in if keep_in else cin), (r_out if keep_out else cout)
        core = _conv(core_in, core_out, k, geom, stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
                     bias=geom.bias and not keep_out, **fk)
        return ([_conv(cin, r_in, (1, 1), geom, **fk)] if keep_in else []) + [core] + (
            [_conv(r_out, cout, (1, 1), geom, bias=geom.bias, **fk)] if keep_out else [])
    (r,) = plan.ranks
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    if isinstance(geom.padding, str):
        pv: tuple[int, int] | str = geom.padding
        ph: tuple[int, int] | str = geom.padding
    else:
        pv, ph = (geom.padding[0], 0), (0, geom.padding[1])
    return [
        _conv(cin, r, (1, 1), geom, **fk),
        _conv(r, r, (k[0], 1), geom, stride=(sh, 1), padding=pv, dilation=(dh, 1), groups=r, **fk),
        _conv(r, r, (1, k[1]), geom, stride=(1, sw), padding=ph, dilation=(1, dw), groups=r, **fk),
        _conv(r, cout, (1, 1), geom, bias=geom.bias, **fk),
    ]


def decompose_weights(weight: Tensor, bias: Tensor | None, geom: ConvGeometry,
                      plan: FactorPlan, **cp_options: object) -> tuple[list[Tensor], float]:
    """Data-free factor weights for ``plan`` and the relative error ‖W−Ŵ‖/‖W‖.

    The returned list holds one weight per factor module, in order; the bias (if any)
    belongs to the last factor and is copied unchanged.
    """
    cin, cout = geom.in_channels, geom.out_channels
    kh, kw = geom.kernel_size
    if plan.method == "svd":
        (r,) = plan.ranks
        mat = weight.reshape(cout, -1)
        a, b = truncated_svd(mat, r)
        err = relative_error(mat, a @ b)
        if geom.linear:
            return [b, a], err
        return [b.reshape(r, cin, kh, kw), a.reshape(cout, r, 1, 1)], err
    if plan.method == "tucker":
        r_out, r_in = plan.ranks
        core, u_out, u_in = tucker2(weight, (r_out, r_in))
        w_hat = torch.einsum("abhw,oa,ib->oihw", core.double(), u_out.double(), u_in.double())
        return [u_in.T.reshape(r_in, cin, 1, 1).contiguous(), core.contiguous(),
                u_out.reshape(cout, r_out, 1, 1).contiguous()], relative_error(weight, w_hat)
    from .cp import cp_conv_factors  # local: CP is heavier and optional for most runs

    (r,) = plan.ranks
    first, vert, horiz, last, err = cp_conv_factors(weight, r, **cp_options)  # type: ignore[arg-type]
    return [first, vert, horiz, last], float(err)


def module_weights(geom: ConvGeometry, plan: FactorPlan, weights: list[Tensor],
                   fold_square: bool = True) -> list[Tensor]:
    """The weights of :func:`build_factor_modules`' layers from the method's full factor chain.

    Every fitting routine returns tucker factors as ``[first 1x1, core, last 1x1]``; this
    folds the square ones (see :func:`tucker_keeps`) into the core, in float64.
    """
    keep_in, keep_out = tucker_keeps(geom, plan, fold_square)
    if keep_in and keep_out:
        return weights
    first, core, last = weights
    folded = core.double()
    if not keep_in:
        folded = torch.einsum("oikl,ic->ockl", folded, first[:, :, 0, 0].double())
    if not keep_out:
        folded = torch.einsum("ao,oikl->aikl", last[:, :, 0, 0].double(), folded)
    folded = folded.to(core.dtype).contiguous()
    return ([first] if keep_in else []) + [folded] + ([last] if keep_out else [])


def output_hw(h: int, w: int, geom: ConvGeometry) -> tuple[int, int]:
    """Output height and width of the conv described by ``geom`` for an h x w input."""
    if geom.padding == "same":
        return h, w
    pad = (0, 0) if geom.padding == "valid" else geom.padding
    assert not isinstance(pad, str)
    oh = (h + 2 * pad[0] - geom.dilation[0] * (geom.kernel_size[0] - 1) - 1) // geom.stride[0] + 1
    ow = (w + 2 * pad[1] - geom.dilation[1] * (geom.kernel_size[1] - 1) - 1) // geom.stride[1] + 1
    return oh, ow


def original_cost(geom: ConvGeometry, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, params) of the original layer for an input of ``in_shape``; MAC = multiply-add."""
    cin, cout = geom.in_channels, geom.out_channels
    bias = cout if geom.bias else 0
    if geom.linear:
        rows = math.prod(in_shape[:-1])
        return rows * cin * cout, cin * cout + bias
    n, _, h, w = in_shape
    oh, ow = output_hw(h, w, geom)
    kh, kw = geom.kernel_size
    per = cin // geom.groups * kh * kw
    return n * cout * oh * ow * per, cout * per + bias


def factor_cost(geom: ConvGeometry, plan: FactorPlan, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, params) of the factorized layer, matching fvcore's per-conv counting."""
    cin, cout = geom.in_channels, geom.out_channels
    bias = cout if geom.bias else 0
    if geom.linear:
        (r,) = plan.ranks
        rows = math.prod(in_shape[:-1])
        return rows * r * (cin + cout), r * (cin + cout) + bias
    n, _, h, w = in_shape
    oh, ow = output_hw(h, w, geom)
    kh, kw = geom.kernel_size
    if plan.method == "svd":
        (r,) = plan.ranks
        return n * oh * ow * r * (cin * kh * kw + cout), r * (cin * kh * kw + cout) + bias
    if plan.method == "tucker":
        r_out, r_in = plan.ranks
        keep_in, keep_out = tucker_keeps(geom, plan)
        macs = n * (h * w * cin * r_in * keep_in + oh * ow * (r_in * r_out * kh * kw + r_out * cout * keep_out))
        return macs, (cin * r_in * keep_in + r_in * r_out * kh * kw + r_out * cout * keep_out + bias)
    (r,) = plan.ranks
    mid_h = oh  # the vertical conv produces the final height at the input width
    macs = n * (h * w * cin * r + mid_h * w * r * kh + oh * ow * r * kw + oh * ow * r * cout)
    return macs, r * (cin + kh + kw + cout) + bias


class Factorized(nn.Module):
    """Holds the factors of one layer under the original module's name (``<fqn>.0``, ``.1``…).

    The rewritten graph calls the factors directly; ``forward`` chains the factors only,
    so for a traced-into conv subclass it does not redo that subclass's extra logic. Other children and tensors of the original
    module (for example a padding module of a conv subclass) are kept beside the factors.
    """

    def __init__(self, factors: list[nn.Module], plan: FactorPlan, geometry: ConvGeometry,
                 fold_square: bool = True) -> None:
        super().__init__()
        for i, f in enumerate(factors):
            self.add_module(str(i), f)
        self.n_factors = len(factors)
        self.plan = plan
        self.geometry = geometry
        self.fold_square = fold_square  # the layout (see tucker_keeps), so a save can rebuild it

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.n_factors):
            x = self._modules[str(i)](x)  # type: ignore[misc]
        return x

    def extra_repr(self) -> str:
        return f"method={self.plan.method}, ranks={self.plan.ranks}"

