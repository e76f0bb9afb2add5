"""Measured latency: time layers and whole models on the user's device and backend.

Why: MACs do not predict time. A factor chain adds ops that each pay a fixed per-call
cost, thin channel counts run below peak throughput, and inductor lowers a chain
differently from eager. ``latency_target`` therefore allocates ranks on measured per-layer
cost curves and checks the result on the whole model. This module is that measurement
layer, and nothing more:

* :func:`time_interleaved` — median per-call time of several callables, interleaved round
  by round so that drifts in machine load hit every one of them alike;
* :func:`prepare` — a callable that runs a module eagerly or compiled by inductor, in the
  example input's device, dtype and memory format;
* :class:`LayerSpec`, :func:`build_layer`, :class:`MeasuredLayerTimer` — one conv (the
  original or a factor chain) at one input shape, timed side by side with the other
  candidates for the same conv;
* :func:`time_models` — whole models side by side in one process;
* :class:`ProfileCache` — per-layer times on disk, keyed by everything that changes them
  (device, thread count, torch, backend, dtype, layout, shapes).

Per-layer times include the per-call overhead of running one module on its own (for
eager, entering ``inference_mode``; for inductor, the guard check), and a layer timed alone
is not fused with its neighbours (BN, ReLU), so the sum of layer times is not the model's
time; the whole-model measurement corrects for that.
"""
from __future__ import annotations

import builtins
import contextlib
import copy
import gc
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .convs import ConvGeometry
from .factors import FactorPlan, build_factor_modules, conv_module, tucker_keeps

__all__ = [
    "BACKENDS", "Timing", "time_interleaved", "prepare", "time_models", "LayerSpec", "build_layer",
    "layer_structure", "LayerTimer", "MeasuredLayerTimer", "ProfileKey", "profile_key", "ProfileCache",
    "default_cache_dir", "device_name",
]

log = logging.getLogger(__name__)

BACKENDS = ("eager", "inductor")


# --------------------------------------------------------------------------------------
# Interleaved timing
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Seconds per call of one callable: the median of its samples and their spread.

    ``spread`` is the interquartile range (inclusive quartiles) of the per-call samples,
    0 for a single sample; ``n`` is the number of samples, ``inner`` the calls per sample.
    ``best`` is the fastest sample: on a loaded CPU, noise only ever adds time, so it can
    be steadier than the median when other processes compete for the cores.
    """

    median: float
    spread: float
    n: int
    inner: int = 1
    best: float = math.nan
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if math.isnan(self.best):  # not given: the median is the best estimate there is
            object.__setattr__(self, "best", self.median)


def _summarize(samples: Sequence[float], inner: int) -> Timing:
    spread = 0.0
    if len(samples) >= 2:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        spread = max(q3 - q1, 0.0)
    return Timing(statistics.median(samples), spread, len(samples), inner, min(samples), tuple(samples))


def _sample(fn: Callable[[], Any], calls: int, device: torch.device, clock: Callable[[], float]) -> float:
    """Seconds for ``calls`` back-to-back calls, with the device drained before and after."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = clock()
    for _ in range(calls):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    return max(clock() - start, 0.0)


def _inner_calls(fastest: float, min_sample_s: float, max_inner: int) -> int:
    if min_sample_s <= 0 or not math.isfinite(fastest):
        return 1
    return max(1, min(max_inner, math.ceil(min_sample_s / max(fastest, 1e-9))))


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, warmup: int, rounds: int, device: torch.device,
                     clock: Callable[[], float] = time.perf_counter, min_sample_s: float = 1e-3,
                     max_inner: int = 1000) -> dict[str, Timing]:
    """Median seconds per call of each fn, sampled round-robin so load drifts hit all alike.

    Each fn is first called ``warmup`` times (not recorded; the fastest warm-up call sets
    how many calls one sample makes, so that a sample lasts at least ``min_sample_s`` —
    a single sub-millisecond call is mostly clock and scheduler noise). Then every round
    takes one sample of every fn; round ``r`` starts at the ``r``-th fn (a rotation), so
    no fn always runs first or always after the same one. Python's garbage collector is
    paused during the rounds. With ``warmup=0`` or ``min_sample_s<=0`` a sample is one call.
    """
    if rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup: expected 0 or more, got {warmup}")
    names = list(fns)
    if not names:
        return {}
    inner: dict[str, int] = {}
    for name in names:
        fastest = math.inf
        for _ in range(warmup):
            fastest = min(fastest, _sample(fns[name], 1, device, clock))
        inner[name] = _inner_calls(fastest, min_sample_s, max_inner)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(_sample(fns[name], inner[name], device, clock) / inner[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _summarize(samples[name], inner[name]) for name in names}


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------
def _tensors(values: Iterable[Any]) -> list[Tensor]:
    return [v for v in values if isinstance(v, Tensor)]


def _is_channels_last(t: Tensor) -> bool:
    """Strictly NHWC: a tensor that is both NCHW- and NHWC-contiguous (C=1 or H=W=1) is not."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _match_example(module: nn.Module, example: tuple[Any, ...]) -> nn.Module:
    """``module`` in eval mode on the example's device, dtype and memory format.

    Why a copy (only when something must change): timing must not switch the caller's
    model to eval mode, another dtype or channels_last behind its back.
    """
    tensors = _tensors(example)
    floats = [t for t in tensors if t.is_floating_point()]
    device = tensors[0].device if tensors else None
    dtype = floats[0].dtype if floats else None
    channels_last = any(_is_channels_last(t) for t in floats)
    state = list(module.parameters()) + list(module.buffers())
    needs = any(m.training for m in module.modules())
    needs = needs or any(device is not None and t.device != device for t in state)
    needs = needs or any(dtype is not None and t.is_floating_point() and t.dtype != dtype for t in state)
    needs = needs or (channels_last and any(t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last)
                                            for t in module.parameters()))
    if not needs:
        return module
    out = copy.deepcopy(module).eval()
    out = out.to(device=device, dtype=dtype) if dtype is not None else out.to(device=device)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return out


def _entry(module: nn.Module) -> Callable[..., Any]:
    """A function that calls ``module``, with a code object of its own.

    Why: dynamo keeps compiled graphs and its recompile limit per code object. Every
    ``torch.compile(module)`` enters through the same shared wrapper code, so after 8
    modules of different shapes dynamo stops compiling and silently runs the rest eagerly
    (and each call walks the guards of all earlier ones). A fresh code object per module
    gives each one its own cache.
    """
    code = _call_module.__code__.replace(co_name=f"convfx_latency_{type(module).__name__}")
    scope = {"__builtins__": builtins, "_module": module}
    return types.FunctionType(code, scope, code.co_name)


def _call_module(*args: Any) -> Any:
    return _module(*args)  # type: ignore[name-defined]  # noqa: F821  (bound per copy by _entry)


def prepare(module: nn.Module, example: tuple[Any, ...], backend: str) -> Callable[[], Any]:
    """A no-argument callable running ``module`` on ``example`` under ``inference_mode``.

    ``backend``: ``"eager"``, or ``"inductor"`` (``torch.compile(dynamic=False)``, compiled
    here by one call, so that compile time is never timed). The module runs in eval mode on
    the example's device and floating dtype, and in channels_last when the example is;
    it is copied first if any of that has to change.
    """
    if backend not in BACKENDS:
        raise ValueError(f"latency_backend: expected one of {BACKENDS}, got {backend!r}")
    module = _match_example(module, example)
    if backend == "eager":
        def run_eager() -> Any:
            with torch.inference_mode():
                return module(*example)
        return run_eager
    compiled = torch.compile(_entry(module), backend="inductor", dynamic=False)

    def run_compiled() -> Any:
        with torch.inference_mode():
            return compiled(*example)
    run_compiled()
    return run_compiled


def time_models(models: Mapping[str, nn.Module], example_inputs: tuple[Any, ...], backend: str, *,
                warmup: int, rounds: int, device: torch.device, min_sample_s: float = 1e-3,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Whole models side by side (interleaved, see :func:`time_interleaved`), in one process.

    Why side by side: on a shared or thermally throttled machine, absolute times drift
    between runs; original and compressed measured in the same rounds stay comparable.
    """
    fns = {name: prepare(m, example_inputs, backend) for name, m in models.items()}
    return time_interleaved(fns, warmup=warmup, rounds=rounds, device=torch.device(device), clock=clock,
                            min_sample_s=min_sample_s)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """One conv (or Linear) at one input shape: the original (``plan=None``) or a factor chain.

    ``fold_square`` is kept only where it changes the chain (a tucker plan at full channel
    rank, see :func:`passes.factors.tucker_keeps`); elsewhere it is normalized to True so
    that equal layers compare (and cache) equal.
    """

    geometry: ConvGeometry
    input_shape: tuple[int, ...]
    plan: FactorPlan | None = None
    fold_square: bool = True

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.input_shape)
        object.__setattr__(self, "input_shape", shape)
        g = self.geometry
        if g.linear:
            if not shape or shape[-1] != g.in_channels:
                raise ValueError(f"input_shape: a Linear({g.in_channels}, ...) needs last dim {g.in_channels}, "
                                 f"got {shape}")
        elif len(shape) != 2 + len(g.kernel_size) or shape[1] != g.in_channels:
            raise ValueError(f"input_shape: a {len(g.kernel_size)}-d conv with {g.in_channels} input channels needs "
                             f"(N, {g.in_channels}, {len(g.kernel_size)} spatial sizes), got {shape}")
        if self.plan is None or tucker_keeps(g, self.plan, True) == (True, True):
            object.__setattr__(self, "fold_square", True)

    @property
    def conv(self) -> tuple[ConvGeometry, tuple[int, ...]]:
        """What identifies the conv this candidate replaces: its geometry and input shape."""
        return self.geometry, self.input_shape

    def original(self) -> "LayerSpec":
        """The spec of the unfactorized conv this candidate replaces."""
        return replace(self, plan=None, fold_square=True)


def _original_module(g: ConvGeometry, **factory: Any) -> nn.Module:
    return conv_module(g, **factory)


def build_layer(spec: LayerSpec, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                seed: int = 0) -> nn.Module:
    """The module ``spec`` describes, in eval mode, with random weights from a fixed seed.

    Why random: time does not depend on weight values, and a fixed seed keeps runs
    reproducible without touching the caller's random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.plan is None:
            module = _original_module(spec.geometry)
        else:
            module = nn.Sequential(*build_factor_modules(spec.geometry, spec.plan, fold_square=spec.fold_square))
    return module.to(device=device, dtype=dtype).eval()


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.modules.conv._ConvNd):
        pad = m.padding if isinstance(m.padding, str) else "x".join(map(str, m.padding))
        kind = "conv" if type(m) is nn.Conv2d else type(m).__name__.lower()  # Conv2d keys as they always were
        extra = f" op{'x'.join(map(str, m.output_padding))}" if m.transposed else ""
        return (f"{kind} {m.in_channels}>{m.out_channels} k{'x'.join(map(str, m.kernel_size))} "
                f"s{'x'.join(map(str, m.stride))} p{pad} d{'x'.join(map(str, m.dilation))} g{m.groups} "
                f"b{int(m.bias is not None)} {m.padding_mode}{extra}")
    if isinstance(m, nn.Linear):
        return f"linear {m.in_features}>{m.out_features} b{int(m.bias is not None)}"
    raise TypeError(f"cannot describe {type(m).__name__}")


@lru_cache(maxsize=4096)
def layer_structure(spec: LayerSpec) -> tuple[str, ...]:
    """The layers ``spec`` runs, one string each; equal structures time equally.

    Why: different plans can build the same chain (svd rank r and tucker (r, C_in) with
    folding; tucker at full rank and the original conv), which should be timed once.
    """
    if spec.plan is None:
        layers = [_original_module(spec.geometry, device="meta")]
    else:
        layers = build_factor_modules(spec.geometry, spec.plan, device="meta", fold_square=spec.fold_square)
    return tuple(_describe(m) for m in layers)


# --------------------------------------------------------------------------------------
# Profile cache
# --------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$CONVFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/convfx``, else ``~/.cache/convfx``.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG spec asks.
    """
    env = os.environ.get("CONVFX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "convfx"
    return Path.home() / ".cache" / "convfx"


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device | str) -> str:
    """What, besides shapes, decides a layer's time on ``device``: model and run-time settings.

    CPU: the model name, ``torch.get_num_threads()`` and ``OMP_WAIT_POLICY`` when set (a
    passive policy adds a wake-up to every parallel op). CUDA: the device name, the cuDNN
    version and whether ``cudnn.benchmark`` picks kernels.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)} | cudnn={torch.backends.cudnn.version()} | "
                f"cudnn.benchmark={bool(torch.backends.cudnn.benchmark)}")
    if device.type == "cpu":
        name = f"{_cpu_model()} | threads={torch.get_num_threads()}"
        policy = os.environ.get("OMP_WAIT_POLICY")
        return name + (f" | OMP_WAIT_POLICY={policy.upper()}" if policy else "")
    return device.type


@dataclass(frozen=True)
class ProfileKey:
    """Where a layer time is stored: ``context`` picks the file, ``layer`` the entry in it."""

    context: str
    layer: str

    def __str__(self) -> str:
        return f"{self.context} :: {self.layer}"


def profile_key(spec: LayerSpec, device_name: str, torch_version: str, backend: str, dtype: torch.dtype | str,
                layout: str, statistic: str = "median") -> ProfileKey:
    """The cache key of ``spec`` timed in one context (device, torch, backend, dtype, layout).

    The layer part is the input shape and the chain's layers (:func:`layer_structure`), not
    the plan, so equal chains share an entry whatever plan built them.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    context = (f"device={device_name} || torch={torch_version} || backend={backend} || dtype={dtype_name} || "
               f"layout={layout}" + ("" if statistic == "median" else f" || statistic={statistic}"))
    layer = "x".join(map(str, spec.input_shape)) + " : " + " ; ".join(layer_structure(spec))
    return ProfileKey(context, layer)


def _valid_seconds(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


class ProfileCache:
    """Layer times on disk: one JSON file per context, written atomically.

    Why one file per context: a compress run reads one file, and processes timing on
    different devices or backends never write the same file. Writers read, merge and
    atomically replace the file (temp file in the same directory, fsync, ``os.replace``),
    so a reader sees the old or the new file, never a partial one; an entry may be lost
    to a concurrent writer, which only costs a re-measurement. Anything unreadable
    (truncated or foreign JSON, wrong types, negative or non-finite times, a file of
    another context) is treated as missing, with one warning per file. An unwritable
    directory turns saving off for this instance, with one warning; times stay in memory.
    """

    FORMAT = "convfx-latency-profile"
    VERSION = 1

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.writable = True
        self._entries: dict[str, dict[str, float]] = {}
        self._warned: set[str] = set()

    def path(self, context: str) -> Path:
        """The file holding ``context``'s entries."""
        digest = hashlib.sha256(context.encode()).hexdigest()[:16]
        return self.directory / f"latency-{digest}.json"

    def get(self, key: ProfileKey) -> float | None:
        value = self._load(key.context).get(key.layer)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: ProfileKey, value: float) -> None:
        self.put_many({key: value})

    def put_many(self, items: Mapping[ProfileKey, float]) -> None:
        """Store several times at once: one read-merge-write per context file."""
        by_context: dict[str, dict[str, float]] = {}
        for key, value in items.items():
            if not _valid_seconds(value):
                raise ValueError(f"value: a latency must be a finite number >= 0 seconds, got {value!r}")
            by_context.setdefault(key.context, {})[key.layer] = float(value)
        for context, new in by_context.items():
            memory = self._load(context)
            memory.update(new)
            if not self.writable:
                continue
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                merged = {**self._read(context), **memory}
                self._write(self.path(context), {"format": self.FORMAT, "version": self.VERSION,
                                                 "context": context, "entries": merged})
            except OSError as e:
                self.writable = False
                self._warn_once("io", f"latency profile cache {self.directory} is not writable ({e}); measured "
                                "layer times will not be saved")
                continue
            memory.update(merged)

    def _load(self, context: str) -> dict[str, float]:
        if context not in self._entries:
            self._entries[context] = self._read(context)
        return self._entries[context]

    def _warn_once(self, what: str, message: str) -> None:
        """One warning per file (for its content) and one per instance for I/O errors."""
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)

    def _ignore(self, path: Path, why: str) -> None:
        self._warn_once(str(path), f"latency profile cache: ignoring {path} ({why}); those layers will be "
                                   "re-measured")

    def _read(self, context: str) -> dict[str, float]:
        path = self.path(context)
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as e:
            self._warn_once("io", f"latency profile cache {self.directory} is not readable ({e}); layer times "
                                  "will be measured again")
            return {}
        except UnicodeDecodeError:
            self._ignore(path, "not text")
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            self._ignore(path, "not valid JSON, e.g. a truncated write")
            return {}
        if not isinstance(data, dict) or data.get("format") != self.FORMAT:
            self._ignore(path, "not a convfx latency profile")
            return {}
        if data.get("version") != self.VERSION:
            self._ignore(path, f"profile format version {data.get('version')!r}, expected {self.VERSION}")
            return {}
        if data.get("context") != context:
            self._ignore(path, "its stored context does not match the requested one")
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            self._ignore(path, "'entries' is not a mapping")
            return {}
        good = {k: float(v) for k, v in entries.items() if isinstance(k, str) and _valid_seconds(v)}
        if len(good) != len(entries):
            self._ignore(path, f"{len(entries) - len(good)} entries are not times >= 0 seconds")
        return good

    def _write(self, path: Path, payload: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# --------------------------------------------------------------------------------------
# Layer timers
# --------------------------------------------------------------------------------------
@runtime_checkable
class LayerTimer(Protocol):
    """Seconds per call of each layer; what the latency allocation consumes."""

    def __call__(self, specs: Sequence[LayerSpec]) -> dict[LayerSpec, float]: ...


class MeasuredLayerTimer:
    """Times layers for real on ``device`` with ``backend``, reusing ``cache``.

    Candidates of one conv (same geometry and input shape) are timed interleaved with
    each other (and with the original when it is asked for), so their comparison is
    fair; specs that build the same layers (:func:`layer_structure`) are timed once.
    Every time measured is kept in memory and, with a cache, on disk. ``measured`` counts
    the distinct layers this timer has actually timed. ``statistic`` picks the
    :class:`Timing` field reported: ``"median"``, or ``"best"`` on a CPU shared with other
    work (where noise only adds time).
    """

    def __init__(self, backend: str = "eager", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 cache: ProfileCache | None = None, warmup: int = 2, rounds: int = 7, *,
                 min_sample_s: float = 1e-3, clock: Callable[[], float] = time.perf_counter,
                 seed: int = 0, statistic: str = "median") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"latency_backend: expected one of {BACKENDS}, got {backend!r}")
        if statistic not in ("median", "best"):
            raise ValueError(f"statistic: expected 'median' or 'best', got {statistic!r}")
        self.statistic = statistic
        self.backend = backend
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self.cache = cache
        self.warmup = warmup
        self.rounds = rounds
        self.min_sample_s = min_sample_s
        self.clock = clock
        self.seed = seed
        self.measured = 0
        self._memo: dict[ProfileKey, float] = {}

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def key(self, spec: LayerSpec) -> ProfileKey:
        # The device name is read per call: the thread count may change between calls.
        return profile_key(spec, device_name(self.device), torch.__version__, self.backend, self.dtype, self.layout,
                           self.statistic)

    def __call__(self, specs: Sequence[LayerSpec]) -> dict[LayerSpec, float]:
        groups: dict[tuple[ConvGeometry, tuple[int, ...]], list[LayerSpec]] = {}
        for spec in dict.fromkeys(specs):
            groups.setdefault(spec.conv, []).append(spec)
        out: dict[LayerSpec, float] = {}
        for members in groups.values():
            keys = {spec: self.key(spec) for spec in members}
            todo: dict[ProfileKey, LayerSpec] = {}
            for spec, key in keys.items():
                if key in self._memo or key in todo:
                    continue
                cached = self.cache.get(key) if self.cache is not None else None
                if cached is not None:
                    self._memo[key] = cached
                else:
                    todo[key] = spec
            if todo:
                measured = self._measure(list(todo.values()))
                new = {key: measured[i] for i, key in enumerate(todo)}
                self._memo.update(new)
                if self.cache is not None:
                    self.cache.put_many(new)
            out.update({spec: self._memo[key] for spec, key in keys.items()})
        return out

    def _example(self, spec: LayerSpec) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(spec.input_shape, generator=gen).to(device=self.device, dtype=self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _measure(self, specs: list[LayerSpec]) -> list[float]:
        """Seconds per call (``statistic``) of each spec, all of one conv, timed interleaved."""
        start = time.perf_counter()
        x = self._example(specs[0])
        fns = {str(i): prepare(build_layer(s, self.dtype, self.device, self.seed), (x,), self.backend)
               for i, s in enumerate(specs)}
        ready = time.perf_counter()
        timings = time_interleaved(fns, warmup=self.warmup, rounds=self.rounds, device=self.device,
                                   clock=self.clock, min_sample_s=self.min_sample_s)
        self.measured += len(specs)
        g = specs[0].geometry
        log.debug("timed %d layer(s) of conv %d>%d k%s s%s at %s (%s): prepare %.2fs, timing %.2fs",
                  len(specs), g.in_channels, g.out_channels, g.kernel_size, g.stride, specs[0].input_shape,
                  self.backend, ready - start, time.perf_counter() - ready)
        return [getattr(timings[str(i)], self.statistic) for i in range(len(specs))]
