"""Test-session setup shared by every test module."""
from __future__ import annotations

import os

# libgomp threads busy-wait between parallel regions by default; on a 2-core machine
# shared with subprocesses (DDP and fault tests) that turns millisecond ops into seconds.
# It must be set before torch is imported, which is why it lives here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _register_toy() -> None:
    """The shared toy model/data module (``tests/workers/toy.py``, which the worker scripts also
    run from) as ``convfx_tests_toy``, so test modules import it by name."""
    spec = importlib.util.spec_from_file_location("convfx_tests_toy", Path(__file__).parent / "workers" / "toy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_register_toy()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors run faster without synchronisation on a
    busy machine, and bit-exact comparisons need a fixed thread count. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
