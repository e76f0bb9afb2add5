"""The latency measurement layer (passes/latency.py): timing, backends, layers, profile cache.

No test asserts on real timings (they are noisy on a shared machine): clocks are virtual
or counting, and the one real-timing test (slow) checks only that the numbers are sane.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import passes.latency as latency
from passes.convs import ConvGeometry
from passes.factors import FactorPlan, original_cost, output_hw
from passes.latency import (LayerSpec, LayerTimer, MeasuredLayerTimer, ProfileCache, ProfileKey, Timing,
                            build_layer, default_cache_dir, layer_structure, prepare, profile_key,
                            time_interleaved, time_models)

CPU = torch.device("cpu")
G3 = ConvGeometry(8, 12, (3, 3), (1, 1), (1, 1))
SHAPE3 = (1, 8, 10, 10)


class VirtualClock:
    """A clock that only moves when a scripted fn runs: each call advances it by its next duration."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def fn(self, name: str, durations: Sequence[float]) -> Callable[[], None]:
        it = iter(durations)

        def run() -> None:
            self.calls.append(name)
            self.now += next(it)
        return run


# --------------------------------------------------------------------------------------
# time_interleaved
# --------------------------------------------------------------------------------------
def test_time_interleaved_medians_and_order() -> None:
    clock = VirtualClock()
    warm = [100.0, 100.0]  # warm-up calls are slow and must not count
    fns = {"a": clock.fn("a", warm + [1, 5, 3, 2, 4]),
           "b": clock.fn("b", warm + [10, 10, 30, 20, 10]),
           "c": clock.fn("c", warm + [7, 7, 7, 7, 7])}
    t = time_interleaved(fns, warmup=2, rounds=5, device=CPU, clock=clock, min_sample_s=0)
    assert clock.calls[:6] == ["a", "a", "b", "b", "c", "c"]
    timed = clock.calls[6:]
    assert [timed[i:i + 3] for i in range(0, 15, 3)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"], ["b", "c", "a"]]
    assert list(t) == ["a", "b", "c"]
    assert t["a"] == Timing(3.0, 2.0, 5, 1, 1.0)
    assert (t["b"].median, t["b"].spread, t["b"].best) == (10.0, 10.0, 10.0)
    assert (t["c"].median, t["c"].spread, t["c"].n) == (7.0, 0.0, 5)


def test_time_interleaved_repeats_fast_calls() -> None:
    clock = VirtualClock()
    fns = {"fast": clock.fn("fast", [2e-4] * 1000), "slow": clock.fn("slow", [5e-3] * 1000)}
    t = time_interleaved(fns, warmup=1, rounds=3, device=CPU, clock=clock, min_sample_s=1e-3)
    assert (t["fast"].inner, t["slow"].inner) == (5, 1)
    assert clock.calls.count("fast") == 1 + 3 * 5 and clock.calls.count("slow") == 1 + 3
    assert t["fast"].median == pytest.approx(2e-4) and t["slow"].median == pytest.approx(5e-3)


def test_time_interleaved_arguments() -> None:
    assert time_interleaved({}, warmup=1, rounds=1, device=CPU) == {}
    with pytest.raises(ValueError, match="rounds"):
        time_interleaved({"a": lambda: None}, warmup=1, rounds=0, device=CPU)
    with pytest.raises(ValueError, match="warmup"):
        time_interleaved({"a": lambda: None}, warmup=-1, rounds=1, device=CPU)
    clock = VirtualClock()
    t = time_interleaved({"a": clock.fn("a", [1.0])}, warmup=0, rounds=1, device=CPU, clock=clock)
    assert t["a"] == Timing(1.0, 0.0, 1, 1, 1.0)


def test_time_models_side_by_side() -> None:
    ticks = iter(range(10**6))
    models = {"original": nn.Conv2d(3, 4, 3), "small": nn.Sequential(nn.Conv2d(3, 2, 1), nn.Conv2d(2, 4, 3))}
    x = torch.randn(1, 3, 8, 8)
    t = time_models(models, (x,), "eager", warmup=1, rounds=3, device=CPU, clock=lambda: float(next(ticks)),
                    min_sample_s=0)
    assert list(t) == ["original", "small"]
    assert all(v.n == 3 and v.median == 1.0 for v in t.values())
    assert all(m.training for m in models.values())  # the caller's models are left as they were


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------
def test_prepare_eager_matches_module_and_respects_example() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    fn = prepare(module, (x,), "eager")
    out = fn()
    assert out.dtype == torch.float64 and out.is_contiguous(memory_format=torch.channels_last)
    assert not out.requires_grad
    ref = module.eval().double()(x)
    torch.testing.assert_close(out, ref)
    module.train()  # eval() above was ours; the prepared copy stays independent
    torch.testing.assert_close(fn(), ref)


def test_prepare_leaves_the_callers_module_alone() -> None:
    module = nn.Conv2d(4, 6, 3)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    prepare(module, (x,), "eager")()
    assert module.training and module.weight.dtype == torch.float32 and module.weight.is_contiguous()
    ready = nn.Conv2d(4, 6, 3).eval()
    y = torch.randn(1, 4, 8, 8)
    fn = prepare(ready, (y,), "eager")
    with torch.no_grad():
        ready.weight.zero_()  # no copy was needed, so the prepared callable runs this very module
    assert torch.equal(fn(), ready(y).detach())


@pytest.mark.parametrize("backend", ["", "Eager", "compile", "cudagraphs"])
def test_bad_backend_names_latency_backend(backend: str) -> None:
    with pytest.raises(ValueError, match="latency_backend"):
        prepare(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 2, 2),), backend)
    with pytest.raises(ValueError, match="latency_backend"):
        MeasuredLayerTimer(backend)


@pytest.mark.slow
def test_prepare_inductor_compiles_each_module_separately() -> None:
    """Nine modules of different shapes: all compiled (dynamo's limit is 8 per code object)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    modules = [nn.Sequential(nn.Conv2d(8, 2 + i, 1), nn.Conv2d(2 + i, 8, 3, padding=1)) for i in range(9)]
    before = counters["stats"]["unique_graphs"]
    fns = [prepare(m, (x,), "inductor") for m in modules]
    assert counters["stats"]["unique_graphs"] - before == len(modules)
    for fn, m in zip(fns, modules):
        out = fn()
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, m.eval()(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# LayerSpec and build_layer
# --------------------------------------------------------------------------------------
GEOMETRIES = {
    "3x3": ConvGeometry(8, 12, (3, 3), (1, 1), (1, 1)),
    "3x3 stride2": ConvGeometry(8, 12, (3, 3), (2, 2), (1, 1), bias=True),
    "3x3 valid": ConvGeometry(8, 12, (3, 3), (1, 1), (0, 0)),
    "3x5 stride2x1": ConvGeometry(8, 12, (3, 5), (2, 1), (1, 2)),
    "dilated": ConvGeometry(8, 12, (3, 3), (1, 1), (2, 2), (2, 2)),
    "same": ConvGeometry(8, 12, (3, 3), (1, 1), "same"),
    "reflect": ConvGeometry(8, 12, (3, 3), (1, 1), (1, 1), padding_mode="reflect"),
    "7x7 stride2": ConvGeometry(3, 16, (7, 7), (2, 2), (3, 3)),
    "1x1 stride2": ConvGeometry(8, 12, (1, 1), (2, 2)),
}
PLANS = {
    "tucker": lambda g: FactorPlan("tucker", (5, 3)),
    "tucker full": lambda g: FactorPlan("tucker", (g.out_channels, g.in_channels)),
    "tucker full in": lambda g: FactorPlan("tucker", (5, g.in_channels)),
    "cp": lambda g: FactorPlan("cp", (4,)),
    "svd": lambda g: FactorPlan("svd", (6,)),
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("geom", list(GEOMETRIES))
@pytest.mark.parametrize("fold_square", [True, False])
def test_build_layer_output_shape(geom: str, plan: str, fold_square: bool) -> None:
    g = GEOMETRIES[geom]
    shape = (2, g.in_channels, 11, 13)
    spec = LayerSpec(g, shape, PLANS[plan](g), fold_square)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = build_layer(spec.original())(x).shape
        got = build_layer(spec)(x).shape
    assert got == expected == (2, g.out_channels, *output_hw(11, 13, g))


def test_build_layer_is_seeded_and_leaves_rng_alone() -> None:
    spec = LayerSpec(G3, SHAPE3, FactorPlan("tucker", (4, 4)))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = build_layer(spec, torch.float64), build_layer(spec, torch.float64)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.dtype == torch.float64 for p in a.parameters()) and not a.training


def test_build_layer_linear() -> None:
    g = ConvGeometry(20, 7, bias=True, linear=True)
    x = torch.randn(3, 20)
    assert build_layer(LayerSpec(g, (3, 20)))(x).shape == build_layer(
        LayerSpec(g, (3, 20), FactorPlan("svd", (4,))))(x).shape == (3, 7)


def test_layer_spec_validation_and_normalization() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        LayerSpec(G3, (1, 9, 10, 10))
    with pytest.raises(ValueError, match="input_shape"):
        LayerSpec(G3, (8, 10, 10))
    # fold_square only matters for a tucker plan at full channel rank on some side.
    assert LayerSpec(G3, SHAPE3, FactorPlan("cp", (3,)), False) == LayerSpec(G3, SHAPE3, FactorPlan("cp", (3,)))
    assert LayerSpec(G3, SHAPE3, FactorPlan("tucker", (4, 4)), False).fold_square
    assert not LayerSpec(G3, SHAPE3, FactorPlan("tucker", (4, 8)), False).fold_square
    assert LayerSpec(G3, [1, 8, 10, 10]).input_shape == SHAPE3
    assert len({LayerSpec(G3, SHAPE3), LayerSpec(G3, SHAPE3)}) == 1


def test_equal_chains_share_a_structure() -> None:
    svd = LayerSpec(G3, SHAPE3, FactorPlan("svd", (5,)))
    tucker = LayerSpec(G3, SHAPE3, FactorPlan("tucker", (5, G3.in_channels)))
    full = LayerSpec(G3, SHAPE3, FactorPlan("tucker", (G3.out_channels, G3.in_channels)))
    assert layer_structure(svd) == layer_structure(tucker)
    assert layer_structure(full) == layer_structure(LayerSpec(G3, SHAPE3))
    unfolded = LayerSpec(G3, SHAPE3, FactorPlan("tucker", (5, G3.in_channels)), fold_square=False)
    assert len(layer_structure(unfolded)) == 3


# --------------------------------------------------------------------------------------
# Profile keys and cache
# --------------------------------------------------------------------------------------
SPEC = LayerSpec(G3, SHAPE3, FactorPlan("tucker", (4, 4)))


def key(**over: Any) -> ProfileKey:
    args: dict[str, Any] = {"spec": SPEC, "device_name": "cpu A | threads=2", "torch_version": "2.0",
                            "backend": "eager", "dtype": torch.float32, "layout": "contiguous"}
    args.update(over)
    return profile_key(**args)


@pytest.mark.parametrize("change", [
    {"device_name": "cpu B | threads=2"}, {"device_name": "cpu A | threads=1"}, {"backend": "inductor"},
    {"torch_version": "2.1"}, {"dtype": torch.bfloat16}, {"layout": "channels_last"},
    {"spec": LayerSpec(G3, (2, 8, 10, 10), FactorPlan("tucker", (4, 4)))},
    {"spec": LayerSpec(G3, SHAPE3, FactorPlan("tucker", (4, 5)))}, {"spec": LayerSpec(G3, SHAPE3)},
])
def test_keys_do_not_collide(tmp_path: Path, change: dict[str, Any]) -> None:
    a, b = key(), key(**change)
    assert a != b and str(a) != str(b)
    cache = ProfileCache(tmp_path)
    cache.put(a, 0.5)
    assert ProfileCache(tmp_path).get(b) is None
    assert ProfileCache(tmp_path).get(a) == 0.5


def test_key_names_device_and_backend() -> None:
    k = key(device_name="Some GPU", backend="inductor")
    assert "Some GPU" in str(k) and "inductor" in str(k) and "1x8x10x10" in k.layer


def test_device_name_includes_threads() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = latency.device_name(CPU)
        torch.set_num_threads(2)
        assert "threads=1" in one and latency.device_name(CPU) != one
    finally:
        torch.set_num_threads(before)


def test_cache_round_trip_and_counters(tmp_path: Path) -> None:
    cache = ProfileCache(tmp_path / "new" / "dir")
    assert cache.get(key()) is None
    cache.put_many({key(): 1e-3, key(backend="inductor"): 2e-3})
    assert (cache.get(key()), cache.get(key(backend="inductor"))) == (1e-3, 2e-3)
    assert (cache.hits, cache.misses) == (2, 1)
    fresh = ProfileCache(tmp_path / "new" / "dir")
    assert fresh.get(key(backend="inductor")) == 2e-3 and fresh.hits == 1
    assert sorted(p.name.startswith("latency-") for p in (tmp_path / "new" / "dir").iterdir()) == [True, True]


def test_cache_merges_concurrent_writers(tmp_path: Path) -> None:
    one, two = ProfileCache(tmp_path), ProfileCache(tmp_path)
    assert one.get(key()) is None and two.get(key()) is None  # both loaded the (empty) file
    one.put(key(), 1.0)
    two.put(key(layout="contiguous", spec=LayerSpec(G3, SHAPE3)), 2.0)  # same context file
    fresh = ProfileCache(tmp_path)
    assert fresh.get(key()) == 1.0 and fresh.get(key(spec=LayerSpec(G3, SHAPE3))) == 2.0


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, "1", True])
def test_cache_rejects_bad_values(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ValueError, match="latency"):
        ProfileCache(tmp_path).put(key(), value)


def test_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               caplog: pytest.LogCaptureFixture) -> None:
    cache = ProfileCache(tmp_path)
    cache.put(key(), 1.0)
    path = cache.path(key().context)
    before = path.read_bytes()

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with caplog.at_level(logging.WARNING, logger="passes.latency"):
        cache.put(key(spec=LayerSpec(G3, SHAPE3)), 2.0)
        cache.put(key(spec=LayerSpec(G3, (3, 8, 10, 10))), 3.0)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    assert len([r for r in caplog.records if "not writable" in r.message]) == 1
    assert cache.get(key(spec=LayerSpec(G3, SHAPE3))) == 2.0  # still reused in this process
    assert ProfileCache(tmp_path).get(key()) == 1.0


def test_unwritable_cache_directory_degrades(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = ProfileCache(blocker / "cache")
    with caplog.at_level(logging.WARNING, logger="passes.latency"):
        assert cache.get(key()) is None
        cache.put(key(), 1.0)
        cache.put(key(backend="inductor"), 1.0)
        timer = MeasuredLayerTimer(cache=cache, warmup=0, rounds=1)
        assert timer([LayerSpec(G3, SHAPE3)])[LayerSpec(G3, SHAPE3)] > 0
    assert not cache.writable
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_cache_dir_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVFX_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("CONVFX_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "convfx"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, per the XDG spec
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "convfx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "convfx"
    monkeypatch.setenv("CONVFX_CACHE_DIR", str(tmp_path / "explicit"))
    assert ProfileCache().directory == tmp_path / "explicit"


# --------------------------------------------------------------------------------------
# MeasuredLayerTimer (time_interleaved replaced by a counting fake)
# --------------------------------------------------------------------------------------
class CountingTiming:
    """Stands in for time_interleaved: records each call's fns, runs each once, returns fixed times."""

    def __init__(self) -> None:
        self.groups: list[int] = []

    def __call__(self, fns: dict[str, Callable[[], Any]], **kwargs: Any) -> dict[str, Timing]:
        self.groups.append(len(fns))
        for fn in fns.values():
            fn()
        return {name: Timing(1e-3 * (i + 1), 0.0, 1, 1, 1e-3 * (i + 1)) for i, name in enumerate(fns)}


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingTiming:
    fake = CountingTiming()
    monkeypatch.setattr(latency, "time_interleaved", fake)
    return fake


G1 = ConvGeometry(16, 8, (1, 1))
SHAPE1 = (1, 16, 6, 6)


def candidates() -> list[LayerSpec]:
    return ([LayerSpec(G3, SHAPE3)] + [LayerSpec(G3, SHAPE3, FactorPlan("tucker", (r, r))) for r in (2, 4, 6)]
            + [LayerSpec(G1, SHAPE1), LayerSpec(G1, SHAPE1, FactorPlan("svd", (3,)))])


def test_timer_groups_by_conv_and_dedupes(counting: CountingTiming) -> None:
    timer = MeasuredLayerTimer(warmup=0, rounds=1)
    extra = [LayerSpec(G3, SHAPE3, FactorPlan("svd", (5,))),  # the same chain as tucker (5, C_in)
             LayerSpec(G3, SHAPE3, FactorPlan("tucker", (5, G3.in_channels))),
             LayerSpec(G3, SHAPE3, FactorPlan("tucker", (12, 8)))]  # full rank: the original conv
    specs = candidates() + candidates()[:2] + extra
    out = timer(specs)
    assert set(out) == set(specs)
    assert counting.groups == [5, 2]  # one interleaved group per conv: 4 + svd/tucker shared; 2 for G1
    assert timer.measured == 7
    assert out[extra[0]] == out[extra[1]] and out[extra[2]] == out[LayerSpec(G3, SHAPE3)]
    assert timer(specs) == out and counting.groups == [5, 2]  # remembered without a cache


def test_second_timer_reuses_the_cache(tmp_path: Path, counting: CountingTiming) -> None:
    first = MeasuredLayerTimer(cache=ProfileCache(tmp_path), warmup=0, rounds=1)
    times = first(candidates())
    assert first.measured == 6 and first.cache is not None and first.cache.misses == 6
    cache = ProfileCache(tmp_path)
    second = MeasuredLayerTimer(cache=cache, warmup=0, rounds=1)
    assert second(candidates()) == times
    assert second.measured == 0 and len(counting.groups) == 2 and (cache.hits, cache.misses) == (6, 0)
    # Only the missing candidate of a conv is timed.
    new = LayerSpec(G3, SHAPE3, FactorPlan("tucker", (3, 3)))
    second(candidates() + [new])
    assert second.measured == 1 and counting.groups[-1] == 1


@pytest.mark.parametrize("change", [{"channels_last": True}, {"dtype": torch.float64}, {"statistic": "best"}])
def test_other_context_is_not_a_hit(tmp_path: Path, counting: CountingTiming, change: dict[str, Any]) -> None:
    MeasuredLayerTimer(cache=ProfileCache(tmp_path), warmup=0, rounds=1)(candidates())
    other = MeasuredLayerTimer(cache=ProfileCache(tmp_path), warmup=0, rounds=1, **change)
    other(candidates())
    assert other.measured == 6
    with pytest.raises(ValueError, match="statistic"):
        MeasuredLayerTimer(statistic="mean")


def corrupt_payloads(context: str) -> dict[str, str]:
    good = {"format": ProfileCache.FORMAT, "version": ProfileCache.VERSION, "context": context}
    layer = key().layer

    def with_(**kw: Any) -> str:
        return json.dumps({**good, **kw})
    return {
        "truncated": with_(entries={layer: 1.0})[:-7],
        "empty": "",
        "binary": "\udcff\x00garbage",
        "foreign": json.dumps({"model": "resnet50", "entries": {layer: 1.0}}),
        "list": json.dumps([1, 2, 3]),
        "entries not a dict": with_(entries=[layer, 1.0]),
        "negative": with_(entries={layer: -1.0}),
        "nan": with_(entries={layer: math.nan}),
        "string value": with_(entries={layer: "fast"}),
        "other context": json.dumps({**good, "context": "device=elsewhere", "entries": {layer: 1.0}}),
        "future version": json.dumps({**good, "version": 99, "entries": {layer: 1.0}}),
    }


@pytest.mark.parametrize("kind", list(corrupt_payloads("")))
def test_corrupt_cache_is_remeasured(tmp_path: Path, kind: str, counting: CountingTiming,
                                     caplog: pytest.LogCaptureFixture) -> None:
    spec = LayerSpec(G3, SHAPE3, FactorPlan("tucker", (4, 4)))
    timer = MeasuredLayerTimer(cache=ProfileCache(tmp_path), warmup=0, rounds=1)
    k = timer.key(spec)
    path = timer.cache.path(k.context)  # type: ignore[union-attr]
    path.write_text(corrupt_payloads(k.context)[kind], encoding="utf-8", errors="surrogateescape")
    with caplog.at_level(logging.WARNING, logger="passes.latency"):
        timer([spec, spec.original()])
        timer.cache.get(k)  # type: ignore[union-attr]
    assert timer.measured == 2 and counting.groups == [2]
    assert len([r for r in caplog.records if "re-measured" in r.message]) == 1
    repaired = ProfileCache(tmp_path)
    assert repaired.get(k) is not None  # the corrupt file was replaced by a good one
    assert MeasuredLayerTimer(cache=repaired)([spec]) and counting.groups == [2]


class MacTimer:
    """A deterministic stand-in for measured latency: MACs at a fixed rate plus a per-layer cost."""

    def __call__(self, specs: Sequence[LayerSpec]) -> dict[LayerSpec, float]:
        return {s: original_cost(s.geometry, s.input_shape)[0] * 1e-11 + 1e-5 * len(layer_structure(s))
                for s in specs}


def test_layer_timer_protocol() -> None:
    fake: LayerTimer = MacTimer()
    assert isinstance(fake, LayerTimer) and isinstance(MeasuredLayerTimer(), LayerTimer)
    assert fake([SPEC])[SPEC] > 0


# --------------------------------------------------------------------------------------
# Real timing (sanity only)
# --------------------------------------------------------------------------------------
def test_measured_layer_timer_really_times(tmp_path: Path) -> None:
    """A few milliseconds of real eager timing: positive, finite, and cached."""
    specs = [LayerSpec(G3, SHAPE3), LayerSpec(G3, SHAPE3, FactorPlan("cp", (3,)))]
    timer = MeasuredLayerTimer(cache=ProfileCache(tmp_path), warmup=1, rounds=2, min_sample_s=0)
    out = timer(specs)
    assert all(math.isfinite(v) and v > 0 for v in out.values()) and timer.measured == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_real_timing_is_sane(backend: str, tmp_path: Path) -> None:
    g = ConvGeometry(32, 48, (3, 3), (1, 1), (1, 1))
    shape = (1, 32, 28, 28)
    specs = [LayerSpec(g, shape)] + [LayerSpec(g, shape, FactorPlan("tucker", (r, r))) for r in (8, 16)]
    timer = MeasuredLayerTimer(backend, cache=ProfileCache(tmp_path), warmup=2, rounds=5)
    out = timer(specs)
    assert all(math.isfinite(v) and v > 0 for v in out.values())
    models = {str(i): build_layer(s) for i, s in enumerate(specs)}
    timings = time_models(models, (torch.randn(shape),), backend, warmup=2, rounds=5, device=CPU)
    for t in timings.values():
        assert math.isfinite(t.median) and t.median > 0 and t.spread >= 0 and t.n == 5 and t.best <= t.median
