"""The latency objective with deterministic fake meters (no real timing in the default run)."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import pytest
import torch
from torch import nn

import convfx
from passes.flops import annotate_macs, propagate_shapes
from passes.latency import LayerSpec, Timing, layer_structure
from passes.meta import MACS
from passes.options import CompressOptions
from passes.speed import MAX_ROUNDS, TOLERANCE
from passes.trace import trace
from passes.factors import factor_cost, original_cost

X = torch.randn(2, 3, 16, 16)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


class FakeMeter:
    """Time = MACs x ``per_mac`` + ``per_call`` per conv layer; the whole model runs ``fusion``
    times its layers' sum plus ``overhead``, so per-layer costs do not add up and the
    correction loop has work to do. Timed alone, factor chains cost ``factor_penalty`` more."""

    def __init__(self, per_mac: float = 1e-9, per_call: float = 2e-5, fusion: float = 0.8, overhead: float = 1e-4,
                 factor_penalty: float = 0.0) -> None:
        self.per_mac, self.per_call, self.fusion, self.overhead = per_mac, per_call, fusion, overhead
        self.factor_penalty = factor_penalty
        self.compares = 0
        self.layer_calls = 0
        self.original: nn.Module | None = None

    device = "fake device"

    def layers(self, specs: Sequence[LayerSpec]) -> dict[LayerSpec, float]:
        self.layer_calls += 1
        out = {}
        for s in specs:
            if s.plan is None:
                macs = original_cost(s.geometry, s.input_shape)[0]
                out[s] = macs * self.per_mac + self.per_call
            else:
                macs = factor_cost(s.geometry, s.plan, s.input_shape)[0]
                n = len(layer_structure(s))
                out[s] = macs * self.per_mac + n * self.per_call + self.factor_penalty
        return out

    def model_seconds(self, model: nn.Module) -> float:
        gm = trace(model).gm
        propagate_shapes(gm, (X,))
        annotate_macs(gm)
        total = 0.0
        for n in gm.graph.nodes:
            if MACS in n.meta and n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Conv2d):
                total += n.meta[MACS] * self.per_mac + self.per_call
        return self.fusion * total + self.overhead

    def compare(self, candidate: nn.Module | None) -> tuple[Timing, Timing | None]:
        assert self.original is not None
        o = Timing(self.model_seconds(self.original), 1e-6, 9)
        if candidate is None:
            return o, None
        self.compares += 1
        return o, Timing(self.model_seconds(candidate), 2e-6, 9)


def _compress(meter: FakeMeter, target: float, **kw: Any) -> torch.fx.GraphModule:
    def factory(model: nn.Module, inputs: tuple[Any, ...], backend: str) -> FakeMeter:
        meter.original = model
        return meter

    options = CompressOptions(latency_target=target, latency_meter=factory, progress=False, **kw)
    return convfx.api.compress_with(_net(), X, options)


@pytest.mark.parametrize("target", [0.5, 0.7])
@pytest.mark.parametrize("method", ["tucker", "auto", "svd"])
def test_measured_speedup_meets_the_target(target: float, method: str) -> None:
    meter = FakeMeter()
    gm = _compress(meter, target, method=method)
    lat = gm.convfx_report.latency
    assert lat is not None and lat["reached"]
    assert abs(lat["compressed_ms"] / lat["original_ms"] / target - 1) <= TOLERANCE
    # what the report says was measured is what the meter gives for the returned model
    assert math.isclose(lat["compressed_ms"], meter.model_seconds(gm) * 1e3, rel_tol=1e-9)
    assert lat["measured_speedup"] == pytest.approx(lat["original_ms"] / lat["compressed_ms"])
    assert 1 <= len(lat["rounds"]) <= MAX_ROUNDS
    assert any(r.ms_before is not None for r in gm.convfx_report.layers)
    assert "latency" in gm.convfx_report.to_table()


def test_correction_loop_stops_and_is_needed() -> None:
    """Per-layer sums over-predict the whole model (fusion 0.6): the loop corrects, then stops."""
    meter = FakeMeter(fusion=0.6, overhead=5e-4)
    gm = _compress(meter, 0.6)
    lat = gm.convfx_report.latency
    assert meter.compares <= MAX_ROUNDS
    assert lat["reached"]
    assert abs(lat["rounds"][0][1] * 0.6 - 1) > TOLERANCE  # the first allocation misses ...
    assert len(lat["rounds"]) >= 2 and abs(lat["rounds"][-1][1] * 0.6 - 1) <= TOLERANCE  # ... the loop lands it


def test_a_layer_whose_factorizations_are_all_slower_is_kept_with_the_reason() -> None:
    class SlowOne(FakeMeter):
        def layers(self, specs: Sequence[LayerSpec]) -> dict[LayerSpec, float]:
            out = super().layers(specs)
            return {s: t + (1.0 if s.plan is not None and s.geometry.in_channels == 3 else 0.0)
                    for s, t in out.items()}

    gm = _compress(SlowOne(), 0.7)
    row = next(r for r in gm.convfx_report.layers if r.fqn == "0")
    assert not row.factorized and "measured slower than the original conv" in row.skipped


def test_unreachable_target_is_reported_not_raised() -> None:
    gm = _compress(FakeMeter(overhead=2e-3), 0.05)
    lat = gm.convfx_report.latency
    assert not lat["reached"]
    assert lat["compressed_ms"] < lat["original_ms"]
    assert any("not reached" in n for n in gm.convfx_report.notes)
    assert "not reached" in gm.convfx_report.to_table()


def test_never_slower_than_the_original() -> None:
    """Every factor chain costs a second more: nothing is faster, so every layer is kept."""
    gm = _compress(FakeMeter(factor_penalty=1.0), 0.5)
    rep = gm.convfx_report
    assert not rep.factorized
    assert rep.conv_macs_after == rep.conv_macs_before
    assert all("measured slower" in (r.skipped or "") or r.kind == "linear" for r in rep.layers)


def test_latency_with_calibration_reports_the_kept_allocation() -> None:
    x = torch.randn(32, 3, 16, 16)
    gm = _compress(FakeMeter(), 0.6, calibration=[x[:16], x[16:]])
    rep = gm.convfx_report
    assert rep.latency is not None and rep.latency["reached"]
    assert any(n.startswith("latency_target: allocations fitted under") for n in rep.notes)


def test_report_latency_round_trips_json() -> None:
    gm = _compress(FakeMeter(), 0.6)
    rep = gm.convfx_report
    back = type(rep).from_json(rep.to_json())
    assert back == rep


def _inverted_residual() -> nn.Module:
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, c: int, hidden: int) -> None:
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                    nn.BatchNorm2d(hidden), nn.ReLU6())
            self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.project(self.dw(self.expand(x)))

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(16, 96), Block(16, 96), nn.Conv2d(16, 32, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_method_id_meets_a_latency_target() -> None:
    """``method="id"`` under latency_target: the MAC fraction is corrected to the measured time."""
    meter = FakeMeter(per_call=1e-6)

    def factory(model: nn.Module, inputs: tuple[Any, ...], backend: str) -> FakeMeter:
        meter.original = model
        return meter

    x = torch.randn(32, 3, 16, 16)
    options = CompressOptions(method="id", latency_target=0.7, latency_meter=factory, calibration=[x[:16], x[16:]],
                              progress=False)
    gm = convfx.api.compress_with(_inverted_residual(), X, options)
    lat = gm.convfx_report.latency
    assert lat["reached"] and abs(lat["compressed_ms"] / lat["original_ms"] / 0.7 - 1) <= TOLERANCE
    assert math.isclose(lat["compressed_ms"], meter.model_seconds(gm) * 1e3, rel_tol=1e-9)
    assert gm.convfx_report.widths


@pytest.mark.slow
def test_real_timing_end_to_end(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small real model timed eagerly on this CPU; a second compress reuses the profile cache."""
    monkeypatch.setenv("CONVFX_CACHE_DIR", str(tmp_path))
    model, x = _net(), torch.randn(8, 3, 32, 32)
    gm = convfx.compress(model, x, latency_target=0.7, latency_backend="eager", progress=False)
    lat = gm.convfx_report.latency
    assert lat["original_ms"] > 0 and lat["compressed_ms"] > 0 and lat["compressed_spread_ms"] >= 0
    assert lat["measured_speedup"] >= 1.0  # never slower than the original, as measured
    with torch.no_grad():
        assert gm(x).shape == model(x).shape
    files = list(tmp_path.glob("latency-*.json"))
    assert files
    before = {f: f.read_text() for f in files}
    again = convfx.compress(model, x, latency_target=0.7, latency_backend="eager", progress=False)
    assert {f: f.read_text() for f in files} == before  # nothing new was measured
    assert again.convfx_report.latency["compressed_ms"] == lat["compressed_ms"]


def _conv_weight_meter() -> Callable[[nn.Module, tuple[Any, ...], str], FakeMeter]:
    """A meter factory whose model time counts the weights of every conv type (N-d, transposed)."""

    class Meter(FakeMeter):
        def model_seconds(self, model: nn.Module) -> float:
            return self.fusion * sum(m.weight.numel() * 1e-7 + self.per_call for m in model.modules()
                                     if isinstance(m, nn.modules.conv._ConvNd)) + self.overhead

    meter = Meter()

    def factory(model: nn.Module, inputs: tuple[Any, ...], backend: str) -> FakeMeter:
        meter.original = model
        return meter
    return factory


def test_latency_target_on_conv1d_and_transposed_layers() -> None:
    """The latency objective prices every conv type the pipeline factorizes (N-d specs)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(8, 64, 5, padding=2), nn.ReLU(), nn.Conv1d(64, 64, 5, padding=2), nn.ReLU(),
                        nn.ConvTranspose1d(64, 32, 4, stride=2, padding=1)).eval()
    x = torch.randn(2, 8, 128)
    factory = _conv_weight_meter()
    gm = convfx.api.compress_with(net, x, CompressOptions(latency_target=0.6, latency_meter=factory, progress=False))
    rep = gm.convfx_report
    assert rep.latency is not None and rep.factorized
    assert {r.fqn for r in rep.factorized} <= {"0", "2", "4"}


def test_the_compile_backend_takes_latency_target() -> None:
    factory = _conv_weight_meter()  # dynamo's graphs take their buffers as inputs: count the conv weights
    reports: list[Any] = []
    net = _net().requires_grad_(False)
    torch._dynamo.reset()
    try:
        fast = torch.compile(net, backend="convfx", options={"latency_target": 0.6, "latency_meter": factory,
                                                             "delegate": "eager", "on_report": reports.append})
        with torch.no_grad():
            assert fast(X).shape == (2, 10)
    finally:
        torch._dynamo.reset()
    assert reports and reports[-1].latency is not None and reports[-1].factorized
