"""The pipeline's structure: options checked before tracing, read-only analysis and planning."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import convfx
from passes import pipeline
from passes.budget import budget_allocations
from passes.context import Allocation, Context
from passes.meta import IN_SHAPE, MACS, OUT_SHAPE
from passes.narrow import plan_widths
from passes.options import CompressOptions


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU6(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                         nn.BatchNorm2d(32), nn.ReLU6(), nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16),
                         nn.Conv2d(16, 24, 3, padding=1)).eval()


BAD_OPTIONS = [
    ({"method": "id"}, "method"),
    ({"method": "auto"}, "method"),
    ({"method": "nope"}, "method"),
    ({"flops_target": 0.5, "rank": 0.5}, "rank"),
    ({"flops_target": 1.5}, "flops_target"),
    ({"refine_steps": 10}, "refine_steps"),
    ({"refine_steps": -1}, "refine_steps"),
    ({"rank_multiple": 0}, "rank_multiple"),
    ({"calibration_shrink": float("nan")}, "calibration_shrink"),
    ({"calibration": torch.zeros(2, 3, 8, 8)}, "calibration"),
    ({"calibration_batches": 0}, "calibration_batches"),
    ({"method": "id", "flops_target": 0.5}, "calibration"),
    ({"method": "id", "flops_target": 0.5, "calibration": [torch.zeros(1, 3, 8, 8)], "rank_multiple": 8},
     "rank_multiple"),
    ({"filter_fn": 3}, "filter_fn"),
]


@pytest.mark.parametrize(("kwargs", "arg"), BAD_OPTIONS)
def test_bad_options_fail_before_tracing(kwargs: dict, arg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rule lives in CompressOptions and runs before the model is traced or data is read."""
    def no_trace(*_a: object, **_k: object) -> None:
        raise AssertionError("traced before the options were checked")

    monkeypatch.setattr(pipeline, "trace", no_trace)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        convfx.compress(_net(), torch.randn(1, 3, 8, 8), progress=False, **kwargs)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        CompressOptions(**kwargs)


def test_options_are_frozen_and_replace_revalidates() -> None:
    o = CompressOptions(rank=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.rank = 0.25  # type: ignore[misc]
    assert o.replace(rank=0.25).rank == 0.25
    with pytest.raises(ValueError, match="^flops_target:"):
        o.replace(rank="vbmf", flops_target=2.0)


def _context(options: CompressOptions) -> Context:
    ctx = Context(options, _net(), (torch.randn(1, 3, 8, 8),))
    for stage in pipeline.STAGES:
        stage(ctx)
    return ctx


def test_analysis_writes_meta_with_fvcore_macs() -> None:
    """Shapes and MACs land in node.meta under the named keys; MACs follow the conv formula."""
    ctx = _context(CompressOptions(rank=0.5))
    convs = [n for n in ctx.gm.graph.nodes if n.op == "call_module"
             and isinstance(ctx.gm.get_submodule(str(n.target)), nn.Conv2d)]
    assert len(convs) == 5
    for n in convs:
        conv = ctx.gm.get_submodule(str(n.target))
        _, _, oh, ow = n.meta[OUT_SHAPE]
        assert n.meta[IN_SHAPE][1] == conv.in_channels
        want = conv.out_channels * oh * ow * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        assert n.meta[MACS] == want
    assert ctx.conv_before == sum(n.meta[MACS] for n in convs)


@pytest.mark.parametrize("method", ["tucker", "id"])
def test_planning_never_changes_the_graph(method: str) -> None:
    """Rank sources only read: the graph's code and every tensor are the same after planning."""
    x = torch.randn(16, 3, 8, 8)
    ctx = _context(CompressOptions(method=method, flops_target=0.8, calibration=[x[:8], x[8:]], progress=False))
    code, state = ctx.gm.code, {k: v.clone() for k, v in ctx.gm.state_dict().items()}
    allocations = (plan_widths if method == "id" else budget_allocations)(ctx)
    assert allocations and all(isinstance(a, Allocation) for a in allocations)
    assert ctx.gm.code == code
    after = ctx.gm.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_a_registered_rank_source_drives_compress(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank source is one registered function: here every selected conv at rank 1."""
    from passes.factors import FactorPlan
    from passes.fit import fit_allocations
    from passes.ranks import skip_reason

    def rank_one(ctx: Context) -> list[Allocation]:
        return [Allocation("", {s.fqn: skip_reason(s.geometry) or FactorPlan("svd", (1,)) for s in ctx.chosen})]

    monkeypatch.setitem(pipeline.RANK_SOURCES, "explicit", pipeline.RankSource(rank_one, fit_allocations))
    gm = convfx.compress(_net(), torch.randn(1, 3, 8, 8), progress=False)
    rows = {r.fqn: r for r in gm.convfx_report.layers}
    assert {r.ranks for r in rows.values() if r.factorized} == {(1,)}
    assert gm.get_submodule("3.0").out_channels == 1
