"""Crash-safe checkpoint files.

A training job can be killed at any instant (pre-emption, OOM killer, a failing peer
rank).  The helpers here guarantee that the file under the final name is always either
the previous complete checkpoint or the new complete one, that loading never executes
pickled code, and that every way a checkpoint can be unusable surfaces as one
:class:`~passes.errors.ConvfxError` that names the file and the reason.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import secrets
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from passes.errors import CORRUPT_FILE, STATE_DICT_MISMATCH, UNSAFE_PICKLE, ConvfxError

__all__ = [
    "DIGEST_KEY",
    "atomic_save",
    "load_checkpoint",
    "load_state_dict_strict",
    "refused_pickle_error",
    "remove_partial_saves",
]

logger = logging.getLogger(__name__)

#: Key under which :func:`atomic_save` stores a content digest of a dict checkpoint.
DIGEST_KEY = "__convfx_digest__"

_TMP_SUFFIX = ".tmp"
_MAX_LISTED = 10
_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _tmp_prefix(path: Path) -> str:
    # Hidden and not ending in ".pt": a half-written file can never be mistaken for a
    # checkpoint by globbing for "*.pt".
    return f".{path.name}."


def _digest(obj: Any) -> str:
    """Hash every tensor byte and plain leaf, so silent corruption becomes detectable.

    ``torch.load`` does not verify CRCs of tensor data, so a flipped byte in a weight
    would otherwise load without complaint.
    """
    h = hashlib.blake2b(digest_size=16)

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            if x.layout == torch.strided and not x.is_quantized:
                flat = x.detach().to("cpu").contiguous().reshape(-1)
                if flat.numel():
                    h.update(memoryview(flat.view(torch.uint8).numpy()))
        elif isinstance(x, Mapping):
            h.update(f"D{len(x)}".encode())
            for k in x:
                h.update(repr(k).encode())
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{type(x).__name__}{len(x)}".encode())
            for v in x:
                visit(v)
        else:
            h.update(repr(x).encode())

    visit(obj)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (matters on power loss, harmless otherwise)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, str]:
    """A fresh temp file beside ``path``, created with the usual umask-based permissions
    (``tempfile.mkstemp`` would make it owner-only, and the checkpoint would inherit that)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = str(path.parent / f"{_tmp_prefix(path)}{secrets.token_hex(8)}{_TMP_SUFFIX}")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def atomic_save(obj: Any, path: str | os.PathLike[str], *, checksum: bool = True) -> None:
    """``torch.save`` that never leaves a truncated file under ``path``.

    The object is written to a hidden temporary file in the same directory (same file
    system, so the rename is atomic), flushed and fsync'ed, then moved over ``path``
    with :func:`os.replace`.  A crash at any point leaves either the old file or the new
    one.  With ``checksum=True`` a dict gets a content digest under :data:`DIGEST_KEY`
    that :func:`load_checkpoint` verifies (and strips).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if checksum and isinstance(obj, Mapping):
        body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
        obj = {**body, DIGEST_KEY: _digest(body)}
    fd, tmp_name = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def remove_partial_saves(path: str | os.PathLike[str]) -> int:
    """Delete temporary files that a killed :func:`atomic_save` of ``path`` left behind.

    Returns how many were removed.  Only call this when no other process is saving
    ``path`` at the same time.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return 0
    removed = 0
    prefix = _tmp_prefix(path)
    for p in path.parent.iterdir():
        if p.name.startswith(prefix) and p.name.endswith(_TMP_SUFFIX):
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
    if removed:
        logger.info("removed %d partial checkpoint file(s) next to %s", removed, path)
    return removed


def refused_pickle_error(exc: BaseException, where: str) -> ConvfxError | None:
    """The error for a ``weights_only=True`` load refused for pickled code, else None.

    One explanation for every loader: which global the safe unpickler would not run,
    why, and (when it is a torch or torchvision class) that the file holds a whole
    pickled model rather than a state dict.
    """
    match = _GLOBAL_RE.search(str(exc))
    if match is None:
        return None
    culprit = match.group(1)
    if culprit.startswith(("torch.nn.", "torchvision.")):
        hint = ("the file holds a whole pickled model, not a state dict; in a trusted environment "
                "re-save it with torch.save(model.state_dict(), path)")
    else:
        hint = ("never load checkpoints from untrusted sources with weights_only=False; re-save "
                "trusted ones as state dicts (torch.save(model.state_dict(), path))")
    return ConvfxError(
        f"refused to unpickle the file: it contains pickled code ({culprit}), and convfx only loads "
        "plain tensors and containers (torch.load with weights_only=True)",
        where=where, hint=hint, kind=UNSAFE_PICKLE,
    )


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``) or raise a clear error.

    Missing, empty, truncated, corrupted (including a digest mismatch) and
    code-carrying files all raise :class:`ConvfxError` with ``where`` set to the path
    (``kind`` :data:`~passes.errors.CORRUPT_FILE` or :data:`~passes.errors.UNSAFE_PICKLE`
    for the damaged and the refused ones).
    """
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise ConvfxError("checkpoint file not found", where=where)
    if path.is_dir():
        raise ConvfxError("checkpoint path is a directory, not a file", where=where)
    if path.stat().st_size == 0:
        raise ConvfxError("checkpoint file is empty (an interrupted write?)", where=where, kind=CORRUPT_FILE)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of foreign files; the error below is what matters.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = refused_pickle_error(exc, where)
        if refused is not None:
            raise refused from exc
        raise ConvfxError(
            "file is corrupted or not a torch checkpoint (the unpickler found invalid data)",
            where=where, kind=CORRUPT_FILE,
        ) from exc
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvfxError(
            f"checkpoint file is truncated or corrupted ({type(exc).__name__}: {first})",
            where=where,
            hint="delete it to start over, or restore an intact copy",
            kind=CORRUPT_FILE,
        ) from exc
    if not isinstance(obj, dict):
        raise ConvfxError(f"expected a checkpoint dict, found {type(obj).__name__}", where=where)
    if DIGEST_KEY in obj:
        stored = obj.pop(DIGEST_KEY)
        if stored != _digest(obj):
            raise ConvfxError(
                "checkpoint contents are corrupted (content digest mismatch)",
                where=where,
                hint="delete it to start over, or restore an intact copy",
                kind=CORRUPT_FILE,
            )
    return obj


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... and {len(items) - _MAX_LISTED} more"
    return shown


def _counted(n: int, noun: str, plural: str) -> str:
    return f"{n} {noun if n == 1 else plural}"


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, Any], *, where: str | None = None, hint: str | None = None
) -> None:
    """Load ``state_dict`` into ``model`` or explain exactly why it does not fit.

    ``nn.Module.load_state_dict`` reports shape errors one at a time and mixes them with
    key errors; a checkpoint for a different architecture (e.g. another depth, another
    number of classes, another rank choice of a factorized model) deserves one message
    that counts and lists missing keys, unexpected keys and shape mismatches. ``hint``
    replaces the default advice (a ``module.`` prefix is always pointed out). Nothing
    is loaded when a key or a shape does not fit.
    """
    if not isinstance(state_dict, Mapping):
        raise ConvfxError(f"expected a state dict, found {type(state_dict).__name__}", where=where)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = []
    for k, v in own.items():
        theirs = state_dict.get(k)
        if isinstance(v, torch.Tensor) and isinstance(theirs, torch.Tensor) and v.shape != theirs.shape:
            mismatched.append(f"{k}: checkpoint {tuple(theirs.shape)} vs model {tuple(v.shape)}")
    if missing or unexpected or mismatched:
        counts, lists = [], []
        for items, noun, plural in ((missing, "missing key", "missing keys"),
                                    (unexpected, "unexpected key", "unexpected keys"),
                                    (mismatched, "shape mismatch", "shape mismatches")):
            if items:
                counts.append(_counted(len(items), noun, plural))
                lists.append(f"{plural} ({len(items)}): {_listing(items)}")
        arch = getattr(model, "convfx_arch", None)
        name = arch if isinstance(arch, str) else type(model).__name__
        if unexpected and all(k.startswith("module.") for k in state_dict):
            hint = "the keys carry a 'module.' prefix: it was saved from a DistributedDataParallel wrapper"
        elif hint is None:
            hint = "the state dict was saved from a different architecture (or a different factorization)"
        raise ConvfxError(
            f"state dict does not match the model ({name}): {', '.join(counts)}; " + "; ".join(lists),
            where=where, hint=hint, kind=STATE_DICT_MISMATCH,
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. dtype-incompatible extra state
        raise ConvfxError(f"state dict could not be loaded: {exc}", where=where) from exc
