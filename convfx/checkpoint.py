"""Crash-safe checkpoint files.

A training job can be killed at any instant (pre-emption, OOM killer, a failing peer
rank).  The helpers here guarantee that the file under the final name is always either
the previous complete checkpoint or the new complete one, that loading never executes
pickled code, and that every way a checkpoint can be unusable surfaces as one
:class:`~passes.errors.ConvfxError` that names the file and the reason.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import pickle
import pickletools
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
    "pickled_globals",
    "refused_pickle_error",
    "remove_partial_saves",
]

logger = logging.getLogger(__name__)

#: Key under which :func:`atomic_save` stores a content digest of a dict checkpoint.
DIGEST_KEY = "__convfx_digest__"

_TMP_SUFFIX = ".tmp"
_MAX_LISTED = 10
#: How torch's safe (``weights_only``) unpickler words each refusal to build a Python object;
#: group 1 names the global it would have had to import or call.
_REFUSED_RES = (
    re.compile(r"Unsupported global: GLOBAL ([\w.]+)"),
    re.compile(r"unsupported GLOBAL ([\w.]+) whose module [\w.]+ is blocked"),
    re.compile(r"Trying to call reduce for unrecognized function ([^\n]+?)(?: which belongs to [^\n]*)?$", re.M),
    re.compile(r"Can only create new object for [^\n]*? but got ([^\n]+)$", re.M),
    re.compile(r"Can only build Tensor, [^\n]*? but got ([^\n]+)$", re.M),
)
#: The safe unpickler stops at opcodes it does not know (plain pickles of protocol 0, 4 or 5)
#: before it looks at any global; such files are scanned for globals without being run.
_UNKNOWN_OPCODE = "Unsupported operand"
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE", "BINUNICODE8"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
#: torch's zip writer words a failed write (a full disk, a vanished file system) like this.
_STREAM_WRITER_RE = re.compile(r"PytorchStreamWriter|inline_container")
#: At most this many concatenated pickles are scanned (a legacy torch file holds five).
_MAX_PICKLES = 8


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


def _save_error(exc: OSError, path: Path, doing: str) -> OSError:
    """``exc`` re-worded to name the user's ``path`` (not the hidden temp file), same type and errno."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    message = f"cannot save {path}: {reason}{f' ({doing})' if doing else ''}"
    if exc.errno is None:
        return OSError(message)
    try:
        return type(exc)(exc.errno, message)
    except TypeError:  # an OSError subclass with another constructor
        return OSError(exc.errno, message)


def atomic_save(obj: Any, path: str | os.PathLike[str], *, checksum: bool = True) -> None:
    """``torch.save`` that never leaves a truncated file under ``path``.

    The object is written to a hidden temporary file in the same directory (same file
    system, so the rename is atomic), flushed and fsync'ed, then moved over ``path``
    with :func:`os.replace`.  A crash at any point leaves either the old file or the new
    one.  With ``checksum=True`` a dict gets a content digest under :data:`DIGEST_KEY`
    that :func:`load_checkpoint` verifies (and strips).  Missing parent folders are
    created.  A failure (no such folder possible, no permission, disk full, ``path`` is a
    folder) raises an :class:`OSError` of the same type and errno whose message names
    ``path`` -- the temporary file is an implementation detail -- and removes the
    temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _save_error(exc, path, f"cannot create the folder {path.parent}") from exc
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot save {path}: it is a folder")
    if checksum and isinstance(obj, Mapping):
        body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
        obj = {**body, DIGEST_KEY: _digest(body)}
    try:
        fd, tmp_name = _create_temp(path)
    except OSError as exc:
        raise _save_error(exc, path, f"cannot create a file in {path.parent}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _save_error(exc, path, "") from exc
        if isinstance(exc, RuntimeError) and _STREAM_WRITER_RE.search(str(exc)):
            # torch's zip writer reports a failed write (e.g. a full disk) as a RuntimeError
            raise _save_error(OSError(str(exc).strip().splitlines()[0]), path, "") from exc
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


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of ``path``: ``data.pkl`` of a torch zip file, else the whole file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            return zf.read(names[0]) if names else b""
    return path.read_bytes()


def pickled_globals(data: bytes) -> list[str]:
    """Every ``module.name`` a pickle stream imports, read opcode by opcode and never run.

    ``STACK_GLOBAL`` (protocol 4+) takes its two names from the strings pushed just
    before it, which the pickler writes either literally or as memo references.  A
    malformed stream yields what was found before the damage.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(_MAX_PICKLES):
        if stream.tell() >= len(data):
            break
        memo: dict[int, str | None] = {}
        pushed: list[str | None] = []  # what each op pushed: a string, or None for anything else
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    module, attr = (pushed[-2:] if len(pushed) >= 2 else [None, None])
                    found.append(f"{module or '?'}.{attr or '?'}")
                    pushed.append(None)
                elif name in _STRING_OPS:
                    pushed.append(arg if isinstance(arg, str) else None)
                elif name in _GET_OPS:
                    pushed.append(memo.get(int(arg)))
                elif name in _PUT_OPS:
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name not in ("FRAME", "PROTO", "MARK"):
                    pushed.append(None)
        except (ValueError, EOFError, TypeError, IndexError):  # damaged: keep what was read
            break
    return found


def _safe_globals() -> set[str]:
    """The globals torch's safe unpickler builds (private torch API: empty if it moved)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - a private API; without it every global counts as code
        return set()


def _unsafe_globals_in(path: Path) -> list[str]:
    """The globals in ``path``'s pickle that a safe load would refuse to import."""
    try:
        data = _pickle_bytes(path)
    except (OSError, zipfile.BadZipFile, KeyError, RuntimeError):
        return []
    safe = _safe_globals()
    return list(dict.fromkeys(g for g in pickled_globals(data) if g not in safe))


def refused_pickle_error(exc: BaseException, where: str, path: str | os.PathLike[str] | None = None
                         ) -> ConvfxError | None:
    """The error for a ``weights_only=True`` load refused for pickled code, else None.

    One explanation for every loader: which global the safe unpickler would not run,
    why, and (when it is a torch or torchvision class) that the file holds a whole
    pickled model rather than a state dict.  Every wording of torch's refusal counts
    (an unknown global, a blocked module such as ``os``/``posix``, a call or class it
    will not build); when torch stopped earlier, at an opcode it does not read (plain
    pickles of protocol 0, 4, 5), the file at ``path`` is scanned for globals without
    running it, so that a code-carrying file is never called corrupted.
    """
    text = str(exc)
    culprits: list[str] = []
    for pattern in _REFUSED_RES:
        match = pattern.search(text)
        if match is not None:
            culprits = [match.group(1).strip()]
            break
    if not culprits and path is not None and _UNKNOWN_OPCODE in text:
        culprits = _unsafe_globals_in(Path(path))
    if not culprits:
        return None
    culprit = ", ".join(culprits[:3]) + (f", ... ({len(culprits)} in all)" if len(culprits) > 3 else "")
    if culprits[0].startswith(("torch.nn.", "torchvision.")):
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
        refused = refused_pickle_error(exc, where, path)
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
