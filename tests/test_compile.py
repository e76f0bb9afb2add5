"""PyTorch 2 integration: torch.compile of compressed graphs, torch.export, the "convfx" backend.

Compilation is slow, so the models are tiny and the default run uses the eager/aot_eager
backends; the one inductor (C++ codegen) test is marked slow.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch._dynamo
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import convfx
from convfx import ConvfxError
from convfx import backend as cfx_backend
from convfx.export import REPORT_FILE, export
from convfx.report import Report

torch.manual_seed(0)


def tiny() -> nn.Module:
    """Three convs (3x3, strided 3x3, 1x1) with BN, pooling and a head: every factor kind, fast."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()


class Branchy(nn.Module):
    """Data-dependent control flow: fx keeps it as a leaf, torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


X = torch.randn(2, 3, 12, 12)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    cfx_backend.register()  # idempotent; whether ``import convfx`` does it is tested in a fresh process
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(1)
    m = tiny()
    with torch.no_grad():  # non-trivial BN statistics
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module", params=[("tucker", 0.5), ("cp", 4)], ids=["tucker", "cp"])
def compressed(request: pytest.FixtureRequest, model: nn.Module) -> fx.GraphModule:
    method, rank = request.param  # a small int CP rank keeps the CP fit fast
    return convfx.compress(model, X, method=method, rank=rank)


def _convs(gm: fx.GraphModule) -> int:
    """Conv calls in a graph, as modules or functions (dynamo inlines modules into functions)."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Conv2d):
            n += 1
        elif node.op == "call_function" and node.target in (torch.conv2d, F.conv2d):
            n += 1
    return n


# -- (a) torch.compile of a compressed GraphModule -------------------------------------------

@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compressed_graph_compiles_without_graph_breaks(compressed: fx.GraphModule, backend: str) -> None:
    explained = torch._dynamo.explain(compressed)(X)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(compressed, backend=backend, fullgraph=True)(X)
        want = compressed(X)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cpu_recipe", [False, True], ids=["plain", "freezing-channels_last"])
def test_compressed_graph_compiles_with_inductor(compressed: fx.GraphModule, cpu_recipe: bool) -> None:
    """Plain inductor, and the README's CPU recipe (frozen weights, channels_last), keep the outputs."""
    import torch._inductor.config as inductor_config

    gm, x = compressed, X
    if cpu_recipe:
        gm = copy.deepcopy(compressed).to(memory_format=torch.channels_last)
        x = X.contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(freezing=cpu_recipe):
        got = torch.compile(gm, backend="inductor", fullgraph=True)(x)
        want = compressed(X)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -- (b) torch.export round trip -------------------------------------------------------------

@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_export_round_trip(compressed: fx.GraphModule, tmp_path: Path, dynamic_batch: bool) -> None:
    x1 = X[:1]  # batch 1: the dynamic case must not freeze the batch size to 1
    path = export(compressed, x1, tmp_path / "m.pt2", dynamic_batch=dynamic_batch)
    assert path == (tmp_path / "m.pt2").resolve() and os.listdir(tmp_path) == ["m.pt2"]
    extra = {REPORT_FILE: ""}
    loaded = torch.export.load(path, extra_files=extra).module()
    assert '"conv_macs_before"' in extra[REPORT_FILE]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x1), compressed(x1), rtol=1e-5, atol=1e-6)
        if dynamic_batch:
            x3 = torch.randn(3, 3, 12, 12)
            torch.testing.assert_close(loaded(x3), compressed(x3), rtol=1e-5, atol=1e-6)


def test_export_failure_names_the_node_and_leaves_no_file(tmp_path: Path) -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Branchy(), nn.Conv2d(8, 8, 3)).eval()
    gm = convfx.compress(m, X, rank=0.5)
    target = tmp_path / "b.pt2"
    target.write_bytes(b"previous")
    with pytest.raises(ConvfxError, match="torch.export failed") as info:
        export(gm, X, target)
    assert info.value.where is not None and "Branchy" in info.value.where
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["b.pt2"]


# -- (c) the "convfx" backend ----------------------------------------------------------------

def _recording(seen: list[fx.GraphModule]) -> Callable[..., Any]:
    """A delegate backend that keeps the graph it is given and runs it eagerly."""
    def delegate(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        seen.append(gm)
        return gm.forward
    return delegate


def test_backend_full_rank_is_exact(model: nn.Module) -> None:
    seen: list[fx.GraphModule] = []
    reports: list[Report] = []
    fast = torch.compile(model, backend=cfx_backend.convfx_backend, fullgraph=True,
                         options={"delegate": _recording(seen), "rank": 1.0, "on_report": reports.append})
    with torch.no_grad():
        torch.testing.assert_close(fast(X), model(X), rtol=1e-4, atol=1e-5)
    report = reports[-1]
    assert {r.fqn for r in report.factorized} == {"0", "3", "5"}  # named after the model's layers
    assert len(seen) == 1 and _convs(seen[0]) > 3


def test_backend_low_rank_changes_the_graph(model: nn.Module) -> None:
    seen: list[fx.GraphModule] = []
    reports: list[Report] = []
    fast = torch.compile(model, backend="convfx",
                         options={"delegate": _recording(seen), "rank": 0.25, "method": "tucker",
                                  "on_report": reports.append})
    with torch.no_grad():
        y = fast(X)
        y3 = fast(torch.randn(3, 3, 12, 12))  # a new batch size recompiles (dynamic batch)
    report = reports[-1]
    assert report.conv_reduction > 1.5 and len(report.factorized) == 3
    assert y.shape == (2, 4) and y3.shape == (3, 4)
    assert not torch.allclose(y, model(X), atol=1e-4)
    # Tucker: 3 convs for each 3x3 conv; SVD (2 convs) for the 1x1 conv.
    assert len(seen) == 2 and all(_convs(gm) == 3 + 3 + 2 for gm in seen)


def test_backend_with_eager_delegate_and_cp(model: nn.Module) -> None:
    reports: list[Report] = []
    fast = torch.compile(model, backend="convfx", options={"delegate": "eager", "method": "cp", "rank": 4,
                                                           "on_report": reports.append})
    with torch.inference_mode():
        out = fast(X)
    assert out.shape == (2, 4) and reports[-1].method == "cp"


@pytest.mark.slow
@pytest.mark.parametrize("delegate_options", [{}, {"freezing": True}], ids=["default", "freezing"])
def test_backend_delegates_to_inductor_by_default(model: nn.Module, delegate_options: dict[str, Any]) -> None:
    torch._dynamo.reset()
    reports: list[Report] = []
    fast = torch.compile(model, backend="convfx", options={"rank": 1.0, "delegate_options": delegate_options,
                                                           "on_report": reports.append}, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(X), model(X), rtol=1e-4, atol=1e-4)
    assert len(reports[-1].factorized) == 3


def test_backend_never_freezes_tensors_the_caller_passes() -> None:
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, padding=1)

    fast = torch.compile(f, backend="convfx", options={"delegate": "eager", "rank": 0.25})
    with torch.no_grad():
        for _ in range(2):  # a new weight each call must be used, not the first one frozen
            w = torch.randn(8, 3, 3, 3)
            torch.testing.assert_close(fast(X, w), f(X, w))


def test_backend_refuses_training(model: nn.Module) -> None:
    fast = torch.compile(model, backend="convfx", options={"delegate": "eager", "rank": 0.5})
    with torch.enable_grad(), pytest.raises(Exception, match="inference-only"):
        fast(X)


def test_backend_rejects_unknown_options(model: nn.Module) -> None:
    fast = torch.compile(model, backend="convfx", options={"delegate": "eager", "ranks": 0.5})
    with torch.no_grad(), pytest.raises(Exception, match="unknown key"):
        fast(X)


def test_backend_analysis_does_not_touch_batchnorm_statistics() -> None:
    """compress runs the graph to analyse it; a train-mode BN must not count those runs."""
    m, ref = tiny().train(), tiny().train()
    ref.load_state_dict(m.state_dict())
    fast = torch.compile(m, backend="convfx", options={"delegate": "eager", "rank": 1.0})
    with torch.no_grad():
        fast(X)
        ref(X)
    assert int(m[1].num_batches_tracked) == 1
    torch.testing.assert_close(m[1].running_mean, ref[1].running_mean, rtol=1e-4, atol=1e-5)


# -- (d) registration ------------------------------------------------------------------------

def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, check=False)


def test_import_registers_backend() -> None:
    # Installed entry points are hidden: without them, only the import can make the name known.
    out = _fresh_python("""
        import importlib.metadata as md
        md.entry_points = lambda **kwargs: md.EntryPoints(())
        import torch
        assert "convfx" not in torch._dynamo.list_backends(exclude_tags=())
        import convfx
        assert "convfx" in torch._dynamo.list_backends(exclude_tags=()), "import convfx did not register the backend"
        assert "convfx" in torch._dynamo.list_backends()
        convfx.backend.register()  # idempotent
        convfx.backend.register()
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_entry_point_lookup_does_not_register_twice() -> None:
    """Dynamo loading the entry point imports convfx, whose import must not register first."""
    out = _fresh_python("""
        from importlib.metadata import EntryPoint
        import torch._dynamo.backends.registry as r
        r._lazy_import()
        r._BACKENDS["convfx"] = EntryPoint("convfx", "convfx.backend:convfx_backend", "torch_dynamo_backends")
        fn = r.lookup_backend("convfx")
        assert fn.__name__ == "convfx_backend", fn
        import convfx.backend
        convfx.backend.register()
        assert r.lookup_backend("convfx") is fn
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
