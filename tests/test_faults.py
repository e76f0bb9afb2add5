"""Fault injection: SIGKILLed training runs, damaged checkpoint files, wrong architectures."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from convfx.checkpoint import (
    DIGEST_KEY,
    atomic_save,
    load_checkpoint,
    load_state_dict_strict,
    remove_partial_saves,
)
from convfx.train import CHECKPOINT_NAME, finetune
import convfx_tests_toy as toy  # registered by conftest.py
from passes.errors import CORRUPT_FILE, UNSAFE_PICKLE, ConvfxError

WORKERS = Path(__file__).parent / "workers"
WORKER = WORKERS / "finetune_worker.py"




# The worker runs single-threaded; bit-exact comparisons need the same here.
pytestmark = pytest.mark.usefixtures("one_thread")


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


# ----------------------------------------------------------------- SIGKILL trials

# 96 samples / batch 16 = 6 steps per epoch; 3 epochs; a checkpoint after every step.
RECIPE = dict(epochs=3, checkpoint_every=1, augment=True, dropout=0.2, bn_recalibrate=2)
TOTAL_STEPS = 18


def _kill_plan(n: int = 5, seed: int = 2024) -> list[tuple[int, float, float]]:
    """(step whose STEP line arms the kill, extra delay, artificial fsync latency) per trial.

    Distinct steps; every other trial slows fsync down so that the kill very likely lands
    inside ``atomic_save``, between writing the temporary file and renaming it.
    """
    rng = random.Random(seed)
    steps = rng.sample(range(1, TOTAL_STEPS - 4), n)
    plan = []
    for i, step in enumerate(steps):
        slow = 0.04 if i % 2 else 0.0
        plan.append((step, rng.uniform(0.0, 0.1 if slow else 0.03), slow))
    return plan


KILL_PLAN = _kill_plan()


@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, result = toy.train_toy(**RECIPE)
    finally:
        torch.set_num_threads(before)
    assert result["step"] == TOTAL_STEPS
    return model.state_dict()


class _CheckpointWatcher(threading.Thread):
    """Loads every final-named checkpoint file it sees appear while the worker runs."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.stop = threading.Event()
        self.loaded = 0
        self.failures: list[str] = []
        self.temp_names: set[str] = set()

    def run(self) -> None:
        seen: set[tuple[int, int, int]] = set()
        while not self.stop.is_set():
            try:
                entries = list(os.scandir(self.directory))
            except FileNotFoundError:
                entries = []
            for e in entries:
                if not e.name.endswith(".pt"):
                    self.temp_names.add(e.name)
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    load_checkpoint(e.path)
                    self.loaded += 1
                except ConvfxError as exc:
                    self.failures.append(str(exc))
            time.sleep(0.002)


class _Runner:
    """Client of ``workers/fork_runner.py``: one warm interpreter forking training runs."""

    def __init__(self, log: Path) -> None:
        self.log_path = log
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKERS / "fork_runner.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=_worker_env(),
        )

    def line(self) -> str:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            pytest.fail(f"fork runner died:\n{self.log_path.read_text()[-4000:]}")
        return text.strip()

    def start(self, argv: list[str]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory):
    r = _Runner(tmp_path_factory.mktemp("runner") / "runner.log")
    yield r
    r.close()


def _run_and_kill(runner: _Runner, out_dir: Path, ckpt_dir: Path, kill_after: int, delay: float,
                  fsync_delay: float) -> str:
    """Start a run, SIGKILL it ``delay`` s after it reports step ``kill_after``; its EXIT line."""
    runner.start(["--out-dir", str(out_dir), "--ckpt-dir", str(ckpt_dir), "--epochs", "3",
                  "--checkpoint-every", "1", "--bn-recalibrate", "2", "--print-steps",
                  "--fsync-delay", str(fsync_delay)])
    pid = None
    armed = False
    while pid is None or not armed:
        text = runner.line()
        if text.startswith("PID "):
            pid = int(text.split()[1])
        elif text == f"STEP {kill_after}":
            armed = True
        elif text.startswith("EXIT "):
            pytest.fail(f"the run ended ({text}) before step {kill_after}; see {runner.log_path}")
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)  # a no-op on a finished child that the runner has not reaped yet
    while not (text := runner.line()).startswith("EXIT "):
        pass
    return text


@pytest.mark.parametrize(
    "kill_after,delay,fsync_delay", KILL_PLAN, ids=[f"step{k}-{'slowsave' if f else 'plain'}" for k, _, f in KILL_PLAN]
)
def test_sigkill_at_random_moments_then_resume_is_bit_exact(
    kill_after: int, delay: float, fsync_delay: float, tmp_path: Path, runner: _Runner,
    reference_state: dict[str, torch.Tensor],
) -> None:
    ckpt_dir = tmp_path / "ckpt"
    for attempt in range(3):  # a heavily loaded box may let the run finish before the kill
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir()
        watcher = _CheckpointWatcher(ckpt_dir)
        watcher.start()
        try:
            exit_line = _run_and_kill(runner, tmp_path / f"out{attempt}", ckpt_dir, kill_after, delay, fsync_delay)
        finally:
            time.sleep(0.01)
            watcher.stop.set()
            watcher.join()
        assert watcher.loaded > 0 and not watcher.failures, watcher.failures
        assert all(not n.endswith(".pt") for n in watcher.temp_names)
        if exit_line == f"EXIT {-signal.SIGKILL}":
            break
        assert exit_line == "EXIT 0", exit_line
    else:
        pytest.fail("the run finished before the kill landed, three times")

    final = ckpt_dir / CHECKPOINT_NAME
    assert final.exists()  # checkpoint_every=1 and at least one step finished
    leftovers = [p.name for p in ckpt_dir.iterdir() if p != final]
    assert all(n.startswith(f".{CHECKPOINT_NAME}.") and n.endswith(".tmp") for n in leftovers)
    killed_at = load_checkpoint(final)["global_step"]
    # the last step of an epoch is saved by the epoch-end checkpoint, after validation
    assert kill_after - (kill_after % 6 == 0) <= killed_at <= TOTAL_STEPS

    model, result = toy.train_toy(ckpt_dir=ckpt_dir, **RECIPE)
    assert result["resumed_from"] == killed_at and result["step"] == TOTAL_STEPS
    assert _equal_states(model.state_dict(), reference_state)
    assert not [p for p in ckpt_dir.iterdir() if p.name != CHECKPOINT_NAME]  # partial saves cleaned up


# ------------------------------------------------------------- damaged checkpoints


class _Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _good_checkpoint(path: Path) -> None:
    atomic_save({"model": {"w": torch.full((4096,), 1.2345)}, "step": 3}, path)


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("missing", "not found"),
        ("directory", "directory"),
        ("empty", "empty"),
        ("truncate-1%", "truncated or corrupted"),
        ("truncate-50%", "truncated or corrupted"),
        ("truncate-99%", "truncated or corrupted"),
        ("garbage", "corrupted"),
        ("flipped-weight-bytes", "digest mismatch"),
        ("pickled-code", "refused to unpickle"),
        ("not-a-dict", "expected a checkpoint dict"),
    ],
)
def test_damaged_checkpoints_raise_clear_errors(damage: str, reason: str, tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    marker = tmp_path / "code-ran"
    _damage(path, damage, marker)
    with pytest.raises(ConvfxError, match=reason) as info:
        load_checkpoint(path)
    assert info.value.where == str(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage,kind",
    [
        ("empty", CORRUPT_FILE),
        ("truncate-50%", CORRUPT_FILE),
        ("garbage", CORRUPT_FILE),
        ("flipped-weight-bytes", CORRUPT_FILE),
        ("pickled-code", UNSAFE_PICKLE),
    ],
)
def test_damaged_checkpoint_errors_carry_their_kind(damage: str, kind: str, tmp_path: Path) -> None:
    """Code that handles a failure (e.g. deletes a corrupt file) tests ``kind``, not the wording."""
    path = tmp_path / "ck.pt"
    _damage(path, damage, tmp_path / "code-ran")
    with pytest.raises(ConvfxError) as info:
        load_checkpoint(path)
    assert info.value.kind == kind


def _damage(path: Path, damage: str, marker: Path) -> None:
    """Leave ``path`` as ``damage`` describes; a pickled payload would create ``marker``."""
    if damage == "directory":
        path.mkdir()
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage.startswith("truncate"):
        _good_checkpoint(path)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * int(damage.split("-")[1][:-1]) / 100)])
    elif damage == "garbage":
        path.write_bytes(random.Random(0).randbytes(5000))
    elif damage == "flipped-weight-bytes":
        _good_checkpoint(path)
        data = bytearray(path.read_bytes())
        pattern = torch.tensor([1.2345]).numpy().tobytes()
        at = data.find(pattern * 4)
        assert at >= 0
        data[at + 100 : at + 104] = b"\x00\x00\x80\x7f"  # one weight becomes +inf
        path.write_bytes(bytes(data))
    elif damage == "pickled-code":
        torch.save({"model": {}, "payload": _Evil(marker)}, path)
    elif damage == "not-a-dict":
        torch.save([torch.ones(2)], path)


def test_finetune_refuses_to_overwrite_a_damaged_checkpoint(tmp_path: Path) -> None:
    train, _ = toy.make_loaders(n_train=32)
    finetune(toy.make_model(), train, epochs=1, lr=0.01, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConvfxError, match="truncated") as info:
        finetune(toy.make_model(), train, epochs=1, lr=0.01, checkpoint_dir=tmp_path, progress=False)
    assert str(path) in str(info.value)


def test_digest_is_stripped_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    atomic_save({"x": torch.arange(5), "n": 1}, path)
    loaded = load_checkpoint(path)
    assert DIGEST_KEY not in loaded and torch.equal(loaded["x"], torch.arange(5))
    atomic_save(torch.load(path, weights_only=True), path)  # re-saving a loaded file with a digest
    assert load_checkpoint(path)["n"] == 1


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_save_interrupted_mid_write_keeps_old_file(existing: bool, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / CHECKPOINT_NAME
    if existing:
        atomic_save({"version": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"version": 2}, path)
    monkeypatch.undo()
    if existing:
        assert load_checkpoint(path)["version"] == 1
    else:
        assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([CHECKPOINT_NAME] if existing else [])


def test_remove_partial_saves_only_touches_temp_files(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    atomic_save({"a": 1}, path)
    (tmp_path / f".{CHECKPOINT_NAME}.deadbeef.tmp").write_bytes(b"partial")
    (tmp_path / "other.pt").write_bytes(b"keep")
    assert remove_partial_saves(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, "other.pt"]


# ---------------------------------------------------------- wrong architecture


class _Wider(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12))
        self.head = nn.Linear(12, 10)


@pytest.mark.parametrize(
    "source,expected",
    [
        (lambda: toy.TinyCNN(num_classes=5).state_dict(), ["2 shape mismatch", "fc.weight: checkpoint (5, 256) vs model (10, 256)", "fc.bias"]),
        (lambda: _Wider().state_dict(), ["missing key", "features.3.weight", "unexpected key", "head.weight", "shape mismatch", "features.0.weight"]),
        (lambda: {f"module.{k}": v for k, v in toy.TinyCNN().state_dict().items()}, ["14 missing key", "14 unexpected key", "module.features.0.weight", "and 4 more", "DistributedDataParallel"]),
    ],
    ids=["other-num-classes", "other-architecture", "ddp-prefix"],
)
def test_wrong_architecture_state_dict_is_explained(source, expected: list[str]) -> None:
    model = toy.TinyCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConvfxError, match="does not match the model") as info:
        load_state_dict_strict(model, source(), where="some.pt")
    text = str(info.value)
    assert text.startswith("[some.pt]")
    for fragment in expected:
        assert fragment in text
    assert _equal_states(model.state_dict(), before)  # nothing half-loaded


def test_resume_into_wrong_architecture_is_refused(tmp_path: Path) -> None:
    train, _ = toy.make_loaders(n_train=32)
    finetune(toy.make_model(), train, epochs=1, lr=0.01, checkpoint_dir=tmp_path, progress=False)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ConvfxError, match="does not match the model") as info:
        finetune(other, train, epochs=1, lr=0.01, checkpoint_dir=tmp_path, progress=False)
    assert str(tmp_path / CHECKPOINT_NAME) in str(info.value)


def test_weights_only_is_enforced_for_buffers_of_code(tmp_path: Path) -> None:
    """A checkpoint saved with an arbitrary object in it is refused, not executed."""
    buf = io.BytesIO()
    torch.save({"ok": torch.ones(1), "obj": _Evil(tmp_path / "x")}, buf)
    (tmp_path / "c.pt").write_bytes(buf.getvalue())
    with pytest.raises(ConvfxError, match="open"):
        load_checkpoint(tmp_path / "c.pt")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------- pickled code is refused, not "corrupted"


class _System:
    """Unpickling this would run a shell command that creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Unimportable:
    """Pickled by reference to a module that does not exist when the file is read."""


_SYSTEM = f"{os.system.__module__}.system"  # posix.system (nt.system on Windows)


def _code_file(path: Path, layout: str, marker: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Write a file whose unpickling would run code; the global the refusal must name."""
    payload: object = _System(marker)
    culprit = _SYSTEM
    if layout.startswith("unimportable"):
        import types

        module = types.ModuleType("convfx_no_such_module")
        monkeypatch.setattr(_Unimportable, "__module__", module.__name__)
        module._Unimportable = _Unimportable  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)  # importable only while pickling
        payload, culprit = _Unimportable(), f"{module.__name__}._Unimportable"
    state = {"w": torch.ones(3), "payload": payload}
    kind, _, proto = layout.removeprefix("unimportable-").partition("-")
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle.dump of protocol N (never run: pickle only records the reference)
        import pickle

        # no tensor: plainly pickled ones reference torch.storage._load_from_bytes, refused first
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0], "payload": payload}, protocol=int(proto)))
    monkeypatch.delitem(sys.modules, "convfx_no_such_module", raising=False)
    return culprit


CODE_LAYOUTS = ["zip", "legacy", "pickle-0", "pickle-1", "pickle-2", "pickle-4", "pickle-5",
                "unimportable-zip", "unimportable-pickle-2", "unimportable-pickle-5"]


@pytest.mark.parametrize("layout", CODE_LAYOUTS)
@pytest.mark.parametrize("loader", ["load_checkpoint", "zoo.load_state_dict_file"])
def test_pickled_code_is_refused_as_code_never_called_corrupted(layout: str, loader: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from convfx import zoo

    path, marker = tmp_path / "evil.pt", tmp_path / "code-ran"
    culprit = _code_file(path, layout, marker, monkeypatch)
    load = load_checkpoint if loader == "load_checkpoint" else zoo.load_state_dict_file
    with pytest.raises(ConvfxError) as info:
        load(path)
    err = info.value
    assert err.kind == UNSAFE_PICKLE and err.where == str(path)
    assert err.reason.startswith("refused to unpickle the file: it contains pickled code (")
    assert culprit in err.reason
    assert "corrupt" not in str(err) and "truncated" not in str(err)
    assert not marker.exists()


@pytest.mark.parametrize("proto", [0, 2, 4, 5])
def test_pickled_globals_reads_every_protocol_without_running_it(proto: int, tmp_path: Path) -> None:
    import pickle

    from convfx.checkpoint import pickled_globals

    marker = tmp_path / "code-ran"
    data = pickle.dumps({"a": _System(marker), "b": [1, _System(marker)], "c": "posix"}, protocol=proto)
    assert _SYSTEM in pickled_globals(data)
    assert pickled_globals(pickle.dumps({"a": [1, 2.0, "x"]}, protocol=proto)) == []
    assert pickled_globals(data[: len(data) // 2]) in ([], [_SYSTEM])  # damaged: what came before
    assert not marker.exists()


def test_a_plain_pickle_without_code_is_still_called_unreadable(tmp_path: Path) -> None:
    """Only files that hold code are called so; other formats torch cannot read stay 'corrupted'."""
    import pickle

    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=5))
    with pytest.raises(ConvfxError, match="corrupted") as info:
        load_checkpoint(path)
    assert info.value.kind == CORRUPT_FILE


# ------------------------------------------------------ failed saves name the user's path


def _temp_files(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith(".tmp")]


def _no_space(*args, **kwargs):
    import errno

    if args and hasattr(args[1], "write"):
        args[1].write(b"PK\x03\x04 part of a zip")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", ["disk-full", "fsync-fails", "rename-fails", "zip-writer", "no-permission",
                                     "parent-is-a-file", "destination-is-a-folder"])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_atomic_save_names_the_destination_and_leaves_no_temp_file(
        failure: str, existing: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / "model.pt"
    if failure == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "sub" / "model.pt"
    elif failure == "destination-is-a-folder":
        path.mkdir()
    elif existing:
        atomic_save({"version": 1}, path)
    expected = {"disk-full": errno.ENOSPC, "fsync-fails": errno.EIO, "rename-fails": errno.EXDEV,
                "zip-writer": None, "no-permission": errno.EACCES, "parent-is-a-file": errno.ENOTDIR,
                "destination-is-a-folder": errno.EISDIR}[failure]
    real_open = os.open

    def refuse(name, *args, **kwargs):
        if str(name).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_open(name, *args, **kwargs)

    def zip_writer(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    if failure == "disk-full":
        monkeypatch.setattr(torch, "save", _no_space)
    elif failure == "fsync-fails":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    elif failure == "rename-fails":
        monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(
            OSError(errno.EXDEV, "Invalid cross-device link", a, b)))
    elif failure == "zip-writer":
        monkeypatch.setattr(torch, "save", zip_writer)
    elif failure == "no-permission":
        monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OSError) as info:
        atomic_save({"version": 2, "w": torch.ones(4)}, path)
    monkeypatch.undo()
    message = str(info.value)
    assert f"cannot save {path}" in message, message
    assert ".tmp" not in message and f".{path.name}." not in message
    assert info.value.errno == expected
    assert not _temp_files(tmp_path)
    if existing and failure not in ("parent-is-a-file", "destination-is-a-folder"):
        assert load_checkpoint(path)["version"] == 1  # the old file survives


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_atomic_save_into_a_read_only_folder_names_the_destination(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"cannot save {folder / 'x.pt'}"):
            atomic_save({"a": 1}, folder / "x.pt")
        assert not _temp_files(folder)
    finally:
        folder.chmod(0o700)


def test_atomic_save_creates_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "model.pt"
    atomic_save({"a": torch.ones(2)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))


# ------------------------------------------------------------------ divergence under DDP


def test_ddp_divergence_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """lr=1e6 under torchrun: both ranks restore the same state and raise the same error, no hang."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "--monitor-interval", "0.2", str(WORKER),
           "--out-dir", str(tmp_path / "out"), "--ckpt-dir", str(tmp_path / "ckpt"), "--epochs", "2",
           "--n-train", "192", "--checkpoint-every", "2", "--lr", "1e6", "--dist-timeout", "60"]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(), timeout=240,
                          start_new_session=True)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert time.monotonic() - start < 120 and "collective operation failed" not in output
    lines = {r: [ln for ln in output.splitlines() if f"rank {r} failed" in ln] for r in (0, 1)}
    assert lines[0] and lines[1], output[-4000:]
    messages = {r: lines[r][0].split("): ", 1)[1] for r in (0, 1)}
    assert messages[0] == messages[1] and "training diverged at epoch 1" in messages[0]
    assert "restored from the" in messages[0]
    assert not (tmp_path / "out").exists()  # neither rank got past finetune
