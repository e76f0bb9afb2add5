"""Factor structures: which small layers replace one conv, what they cost, their weights.

One :class:`FactorPlan` (method + ranks) plus a :class:`ConvGeometry` fully determines the
factor modules, so a saved model can be rebuilt without re-running any decomposition.
Every conv type is treated alike: 1-, 2- and 3-d, plain or transposed.

Structures (input on the left; "1x1" is 1×…×1 in the conv's spatial rank):

* ``tucker`` — 1x1 (C_in→r_in) · core (r_in→r_out, the original kernel, stride, padding,
  dilation, padding mode and output padding) · 1x1 (r_out→C_out, original bias). Kim et
  al. 2015. A factor at full channel rank (r_in = C_in or r_out = C_out) is a square 1x1
  conv that costs MACs and time and removes nothing, so it is folded into the core
  (:func:`tucker_keeps`): (C_out, C_in) leaves one conv, (r_out, C_in) the svd-like pair
  core · 1x1.
* ``cp`` — 1x1 (C_in→R) · one depthwise conv per spatial axis (k_h×1 then 1×k_w for 2-d;
  k for 1-d; k_d×1×1, 1×k_h×1, 1×1×k_w for 3-d) · 1x1 (R→C_out, bias). Each axis's conv
  takes that axis's stride/padding/dilation/output padding. Lebedev et al. 2015.
* ``svd`` — conv with the original kernel and geometry (C_in→r) · 1x1 (r→C_out, bias).
  For 1x1 convs this is the usual pair of 1x1 convs; for a Linear, two Linears.

For a transposed conv the layers that carry the kernel (the core, the first svd factor,
the cp axis convs) are transposed convs with the original stride, padding, output padding
and dilation; the channel-mixing 1x1 factors are plain convs (a 1x1 transposed conv with
stride 1 is the same map). Why this works: a transposed conv mixes channels exactly like a
plain one (``y[o] = Σ_i x[i] ⋆ W[i, o]``), so the channel factors commute with its spatial
part, and a separable kernel's transposed conv is the chain of its per-axis ones.

Factor chains (what :func:`decompose_weights` and the data-aware fits return) hold every
weight in the (out, in/groups, k...) layout of a plain conv (:func:`passes.convs.oi_kernel`);
:func:`module_weights` turns them into what the layers store.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .convs import ConvGeometry, oi_kernel, swap_channel_modes
from .decompose import relative_error, truncated_svd, tucker2

__all__ = [
    "FactorPlan", "METHODS", "build_factor_modules", "decompose_weights", "factor_cost", "chain_kernel",
    "original_cost", "max_ranks", "Factorized", "output_hw", "output_size", "tucker_keeps", "module_weights",
    "conv_module", "cp_factors", "cp_components", "pointwise_matrix",
]

METHODS = ("tucker", "cp", "svd")

_CONV_CLASSES: dict[tuple[int, bool], type[nn.modules.conv._ConvNd]] = {
    (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d,
}


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
    if method == "tucker":
        return (geom.out_channels, geom.in_channels)
    if method == "svd":
        return (min(geom.out_channels, geom.in_channels * math.prod(geom.kernel_size)),)
    dims = sorted([geom.out_channels, geom.in_channels, *geom.kernel_size])
    return (math.prod(dims[:-1]),)


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


def conv_module(geom: ConvGeometry, **factory: object) -> nn.Module:
    """A fresh layer of ``geom``'s class and geometry (Conv1d … ConvTranspose3d, or Linear)."""
    if geom.linear:
        return nn.Linear(geom.in_channels, geom.out_channels, bias=geom.bias, **factory)  # type: ignore[arg-type]
    return _conv(geom.in_channels, geom.out_channels, geom.kernel_size, geom, **_spatial(geom),
                 groups=geom.groups, bias=geom.bias, **factory)


def _spatial(geom: ConvGeometry) -> dict[str, object]:
    """The geometry the layer carrying the whole kernel takes (the core, svd's first factor)."""
    return {"stride": geom.stride, "padding": geom.padding, "dilation": geom.dilation,
            "transposed": geom.transposed, "output_padding": geom.output_padding}


def _conv(cin: int, cout: int, k: tuple[int, ...], geom: ConvGeometry, *, stride: tuple[int, ...] | None = None,
          padding: tuple[int, ...] | str | None = None, dilation: tuple[int, ...] | None = None, groups: int = 1,
          bias: bool = False, transposed: bool = False, output_padding: tuple[int, ...] = (),
          **factory: object) -> nn.Module:
    n = len(k)
    kw: dict[str, object] = {"stride": stride or (1,) * n, "padding": (0,) * n if padding is None else padding,
                             "dilation": dilation or (1,) * n, "groups": groups, "bias": bias,
                             "padding_mode": geom.padding_mode, **factory}
    if transposed:
        kw["output_padding"] = output_padding or (0,) * n
    return _CONV_CLASSES[(n, transposed)](cin, cout, k, **kw)  # type: ignore[arg-type]


def _axis(v: tuple[int, ...], j: int, fill: int) -> tuple[int, ...]:
    """``v[j]`` on axis ``j``, ``fill`` on every other axis."""
    return tuple(x if i == j else fill for i, x in enumerate(v))


def build_factor_modules(geom: ConvGeometry, plan: FactorPlan, *, dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None, fold_square: bool = True) -> list[nn.Module]:
    """The factor layers for ``plan``, uninitialised (weights are filled in separately)."""
    fk = {"dtype": dtype, "device": device}
    cin, cout, k = geom.in_channels, geom.out_channels, geom.kernel_size
    ones = (1,) * len(k)
    if geom.linear:
        if plan.method != "svd":
            raise ValueError(f"method: Linear layers are factorized by 'svd', not {plan.method!r}")
        (r,) = plan.ranks
        return [nn.Linear(cin, r, bias=False, **fk), nn.Linear(r, cout, bias=geom.bias, **fk)]  # type: ignore[arg-type]
    if plan.method == "svd":
        (r,) = plan.ranks
        return [_conv(cin, r, k, geom, **_spatial(geom), **fk), _conv(r, cout, ones, geom, bias=geom.bias, **fk)]
    if plan.method == "tucker":
        r_out, r_in = plan.ranks
        keep_in, keep_out = tucker_keeps(geom, plan, fold_square)
        core_in, core_out = (r_in if keep_in else cin), (r_out if keep_out else cout)
        core = _conv(core_in, core_out, k, geom, **_spatial(geom), bias=geom.bias and not keep_out, **fk)
        return ([_conv(cin, r_in, ones, geom, **fk)] if keep_in else []) + [core] + (
            [_conv(r_out, cout, ones, geom, bias=geom.bias, **fk)] if keep_out else [])
    (r,) = plan.ranks
    stages = []
    for j in range(len(k)):
        pad = geom.padding if isinstance(geom.padding, str) else _axis(geom.padding, j, 0)
        stages.append(_conv(r, r, _axis(k, j, 1), geom, stride=_axis(geom.stride, j, 1), padding=pad,
                            dilation=_axis(geom.dilation, j, 1), groups=r, transposed=geom.transposed,
                            output_padding=_axis(geom.output_padding, j, 0) if geom.transposed else (), **fk))
    return [_conv(cin, r, ones, geom, **fk), *stages, _conv(r, cout, ones, geom, bias=geom.bias, **fk)]


def cp_factors(w_oi: Tensor, rank: int, **cp_options: object) -> tuple[list[Tensor], float]:
    """The cp chain of an (C_out, C_in, k...) kernel of any spatial rank, and its relative error.

    ``[first (R, C_in, 1…), one depthwise (R, 1, …, k_j, …) per axis, last (C_out, R, 1…)]``;
    each component's scale is split evenly over the chain (``weight**(1/layers)``) so no
    factor carries extreme magnitudes. For 2-d kernels this is
    :func:`passes.cp.cp_conv_factors`.
    """
    from .cp import cp_als  # local: CP is heavier and optional for most runs

    res = cp_als(w_oi, rank, **cp_options)  # type: ignore[arg-type]
    n = w_oi.dim() - 2
    scale = res.weights.to(torch.float64).clamp_min(0).pow(1 / (n + 2))
    out_f, in_f, *axes = (f.to(torch.float64) * scale for f in res.factors)
    r, dtype, ones = res.rank, res.weights.dtype, (1,) * n
    stages = [f.T.reshape(r, 1, *_axis(tuple(w_oi.shape[2:]), j, 1)).to(dtype) for j, f in enumerate(axes)]
    return [in_f.T.reshape(r, -1, *ones).to(dtype), *stages, out_f.reshape(-1, r, *ones).to(dtype)], res.rel_error


def pointwise_matrix(t: Tensor) -> Tensor:
    """A 1x1 factor's weight as the (out, in) matrix it is."""
    return t.reshape(t.shape[0], t.shape[1])


def _cp_spec(n_axes: int, last: bool) -> str:
    """The einsum of a cp chain: ``rc,rh,rw,or->ochw`` for 2-d (any number of spatial axes)."""
    ax = "hw" if n_axes == 2 else string.ascii_lowercase[-n_axes:]
    ins = ["rc"] + [f"r{a}" for a in ax] + (["or"] if last else [])
    return ",".join(ins) + (f"->oc{ax}" if last else f"->rc{ax}")


def cp_components(first: Tensor, stages: Sequence[Tensor]) -> Tensor:
    """The R rank-one kernels (R, C_in, k...) of a cp chain before its last 1x1 factor."""
    return torch.einsum(_cp_spec(len(stages), False), pointwise_matrix(first),
                        *(s.reshape(s.shape[0], -1) for s in stages))


def chain_kernel(method: str, chain: Sequence[Tensor]) -> Tensor:
    """The (C_out, C_in, k...) kernel a factor chain (oi layout, unfolded) computes."""
    if method == "svd":
        first, last = chain
        return torch.einsum("or,r...->o...", pointwise_matrix(last), first)
    if method == "tucker":
        first, core, last = chain
        return torch.einsum("ab...,oa,bi->oi...", core, pointwise_matrix(last), pointwise_matrix(first))
    first, *stages, last = chain
    return torch.einsum(_cp_spec(len(stages), True), pointwise_matrix(first),
                        *(s.reshape(s.shape[0], -1) for s in stages), pointwise_matrix(last))


def decompose_weights(weight: Tensor, bias: Tensor | None, geom: ConvGeometry,
                      plan: FactorPlan, **cp_options: object) -> tuple[list[Tensor], float]:
    """Data-free factor chain for ``plan`` (oi layout, see the module doc) and ‖W−Ŵ‖/‖W‖.

    ``weight`` is the layer's own (a transposed conv's layout is converted here). The
    returned list holds one weight per factor of the unfolded chain; the bias (if any)
    belongs to the last factor and is copied unchanged.
    """
    w = oi_kernel(weight, geom)
    cin, cout = geom.in_channels, geom.out_channels
    ones = (1,) * (w.dim() - 2)
    if plan.method == "svd":
        (r,) = plan.ranks
        mat = w.reshape(cout, -1)
        a, b = truncated_svd(mat, r)
        err = relative_error(mat, a @ b)
        if geom.linear:
            return [b, a], err
        return [b.reshape(r, cin, *w.shape[2:]), a.reshape(cout, r, *ones)], err
    if plan.method == "tucker":
        r_out, r_in = plan.ranks
        core, u_out, u_in = tucker2(w, (r_out, r_in))
        chain = [u_in.T.reshape(r_in, cin, *ones).contiguous(), core.contiguous(),
                 u_out.reshape(cout, r_out, *ones).contiguous()]
        return chain, relative_error(w, chain_kernel("tucker", [t.double() for t in chain]))
    return cp_factors(w, plan.ranks[0], **cp_options)


def _transposed_layers(geom: ConvGeometry, plan: FactorPlan, fold_square: bool) -> list[int]:
    """Indices of the non-depthwise factor layers that are transposed convs (they store (in, out, k…))."""
    if not geom.transposed or plan.method == "cp":  # cp's depthwise axis convs store the same either way
        return []
    if plan.method == "svd":
        return [0]
    return [1 if tucker_keeps(geom, plan, fold_square)[0] else 0]


def module_weights(geom: ConvGeometry, plan: FactorPlan, weights: list[Tensor],
                   fold_square: bool = True) -> list[Tensor]:
    """The weights of :func:`build_factor_modules`' layers from the method's full factor chain.

    Every fitting routine returns tucker factors as ``[first 1x1, core, last 1x1]``; this
    folds the square ones (see :func:`tucker_keeps`) into the core, in float64, and stores
    transposed layers' kernels in their own layout.
    """
    keep_in, keep_out = tucker_keeps(geom, plan, fold_square)
    out = list(weights)
    if not (keep_in and keep_out):
        first, core, last = weights
        folded = core.double()
        if not keep_in:
            folded = torch.einsum("oi...,ic->oc...", folded, pointwise_matrix(first).double())
        if not keep_out:
            folded = torch.einsum("ao,oi...->ai...", pointwise_matrix(last).double(), folded)
        folded = folded.to(core.dtype).contiguous()
        out = ([first] if keep_in else []) + [folded] + ([last] if keep_out else [])
    for i in _transposed_layers(geom, plan, fold_square):
        out[i] = swap_channel_modes(out[i]).contiguous()
    return out


def output_size(in_size: Sequence[int], geom: ConvGeometry) -> tuple[int, ...]:
    """Spatial output size of the conv described by ``geom`` for a spatial input size."""
    k, s, d = geom.kernel_size, geom.stride, geom.dilation
    if geom.transposed:
        assert not isinstance(geom.padding, str)
        return tuple((i - 1) * s[j] - 2 * geom.padding[j] + d[j] * (k[j] - 1) + geom.output_padding[j] + 1
                     for j, i in enumerate(in_size))
    if geom.padding == "same":
        return tuple(in_size)
    pad = (0,) * len(k) if geom.padding == "valid" else geom.padding
    assert not isinstance(pad, str)
    return tuple((i + 2 * pad[j] - d[j] * (k[j] - 1) - 1) // s[j] + 1 for j, i in enumerate(in_size))


def output_hw(h: int, w: int, geom: ConvGeometry) -> tuple[int, int]:
    """Output height and width of the 2-d conv described by ``geom`` for an h x w input."""
    oh, ow = output_size((h, w), geom)
    return oh, ow


def original_cost(geom: ConvGeometry, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, params) of the original layer for an input of ``in_shape``; MAC = multiply-add.

    fvcore's count: batch × kernel entries × output positions, or × *input* positions
    for a transposed conv (each input position scatters the whole kernel).
    """
    cin, cout = geom.in_channels, geom.out_channels
    bias = cout if geom.bias else 0
    if geom.linear:
        rows = math.prod(in_shape[:-1])
        return rows * cin * cout, cin * cout + bias
    n, _, *size = in_shape
    positions = math.prod(size) if geom.transposed else math.prod(output_size(size, geom))
    kernel = cin * cout // geom.groups * math.prod(geom.kernel_size)
    return n * positions * kernel, kernel + bias


def factor_cost(geom: ConvGeometry, plan: FactorPlan, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, params) of the factorized layer, matching fvcore's per-conv counting."""
    cin, cout = geom.in_channels, geom.out_channels
    bias = cout if geom.bias else 0
    if geom.linear:
        (r,) = plan.ranks
        rows = math.prod(in_shape[:-1])
        return rows * r * (cin + cout), r * (cin + cout) + bias
    n, _, *size = in_shape
    out = output_size(size, geom)
    p_in, p_out = math.prod(size), math.prod(out)
    p_core = p_in if geom.transposed else p_out  # where the kernel-carrying layer is counted
    kk = math.prod(geom.kernel_size)
    if plan.method == "svd":
        (r,) = plan.ranks
        return n * (p_core * r * cin * kk + p_out * r * cout), r * (cin * kk + cout) + bias
    if plan.method == "tucker":
        r_out, r_in = plan.ranks
        keep_in, keep_out = tucker_keeps(geom, plan)
        macs = n * (p_in * cin * r_in * keep_in + p_core * r_in * r_out * kk + p_out * r_out * cout * keep_out)
        return macs, (cin * r_in * keep_in + r_in * r_out * kk + r_out * cout * keep_out + bias)
    (r,) = plan.ranks
    macs = p_in * cin * r + p_out * r * cout
    for j, k in enumerate(geom.kernel_size):  # axis j's conv: axes < j already at the output size
        before = (*out[:j], *size[j:])
        after = (*out[: j + 1], *size[j + 1:])
        macs += math.prod(before if geom.transposed else after) * r * k
    return n * macs, r * (cin + sum(geom.kernel_size) + cout) + bias


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

