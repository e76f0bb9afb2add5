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
    ({"latency_target": 0.0}, "latency_target"),
    ({"latency_target": 1.5}, "latency_target"),
    ({"latency_target": 0.5, "flops_target": 0.5}, "latency_target"),
    ({"latency_target": 0.5, "latency_backend": "foo"}, "latency_backend"),
    ({"latency_target": 0.5, "rank": 0.5}, "rank"),
    ({"distill_steps": -1}, "distill_steps"),
    ({"distill_steps": 10}, "distill_steps"),
    ({"distill_steps": 10, "calibration": [torch.zeros(1, 3, 8, 8)], "distill_augment": 3}, "distill_augment"),
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


# ------------------------------------------------------------ inputs that do not fit (issue 22)
def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()


BAD_CALIBRATION = [
    ([torch.randn(0, 3, 16, 16)], {"rank": 0.5}, "batch 0 holds no inputs"),
    ([torch.randn(4, 3, 16, 16), torch.randn(4, 5, 16, 16)], {"rank": 0.5}, "batch 1 has 5 channels"),
    ([torch.randn(3, 16, 16)], {"rank": 0.5}, "batch 0 has shape (3, 16, 16)"),
    ([torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)], {"rank": 0.5}, "batch 0 is uint8"),
    ([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 20, 20)], {"flops_target": 0.6}, "batch 1 has shape"),
    ([torch.randn(4, 3, 12, 12)], {"rank": 0.5, "head": True}, "batch 0 (shape (4, 3, 12, 12)) does not fit"),
    ([torch.empty(4, 3, 16, 16, device="meta")], {"rank": 0.5}, "batch 0 is on the meta device"),
    ([torch.full((4, 3, 16, 16), float("nan"))], {"rank": 0.5}, "batch 0 contains NaN"),
    ([torch.randn(4, 3, 16, 16), torch.tensor([[[[float("inf")]]]]).expand(2, 3, 16, 16)], {"rank": 0.5},
     "batch 1 contains NaN or inf"),
]


@pytest.mark.parametrize(("batches", "kwargs", "message"), BAD_CALIBRATION)
def test_calibration_that_does_not_fit_names_calibration_and_the_batch(batches: list, kwargs: dict,
                                                                       message: str) -> None:
    m = _small()
    if kwargs.pop("head", False):  # a Linear head fixes the spatial size
        m = nn.Sequential(*m, nn.Flatten(), nn.Linear(8 * 12 * 12, 4)).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(convfx.ConvfxError, match=r"^\[calibration\] ") as err:
        convfx.compress(m, torch.randn(1, 3, 16, 16), calibration=batches, progress=False, **kwargs)
    assert message in str(err.value)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_all_zero_calibration_images_are_refused_not_fitted_to_zero() -> None:
    m = _small()
    with pytest.raises(convfx.ConvfxError, match=r"^\[0\] .*zero energy"):
        convfx.compress(m, torch.randn(1, 3, 16, 16), rank=0.5, calibration=[torch.zeros(4, 3, 16, 16)],
                        progress=False)


def test_nan_batchnorm_statistics_name_the_module() -> None:
    m = _small()
    m[1].running_var[2] = float("nan")
    with pytest.raises(convfx.ConvfxError, match=r"^\[1\] running_var contains NaN"):
        convfx.compress(m, torch.randn(1, 3, 16, 16), rank=0.5, calibration=[torch.randn(4, 3, 16, 16)],
                        progress=False)


@pytest.mark.parametrize("call", ["compress", "analyze"])
def test_a_meta_device_model_is_refused_by_name(call: str) -> None:
    with torch.device("meta"):
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(convfx.ConvfxError, match=r"^\[model\] 0.weight is on the meta device"):
        getattr(convfx, call)(m, torch.randn(1, 3, 16, 16))
