"""Derived seeds, and the global RNG states a resumable checkpoint carries.

Every random choice of a run is seeded from a tuple such as ``(seed, "step", epoch, i,
rank)``; that is what lets a resumed run draw exactly what an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

import torch

try:  # numpy is optional for torch; seed it when it is there
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["mix_seed", "rng_state", "seed_all", "set_rng_state"]


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_all(seed: int) -> None:
    """Seed torch, ``random`` and numpy: user code may draw from any of them."""
    torch.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % (1 << 32))


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and plain types (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`rng_state` (CUDA only on a machine with the same number of devices)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
