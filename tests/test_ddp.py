"""Two-process gloo DDP fine-tuning on CPU under torchrun: success, failure, resume."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import convfx_tests_toy as toy  # registered by conftest.py
from convfx.checkpoint import load_checkpoint
from convfx.train import CHECKPOINT_NAME

WORKERS = Path(__file__).parent / "workers"
WORKER = WORKERS / "finetune_worker.py"

# 192 samples, 16 per rank and step, 2 ranks: 6 global steps per epoch, 12 in all.
RECIPE = ["--epochs", "2", "--n-train", "192", "--batch-size", "16", "--checkpoint-every", "2"]
DDP_STEPS = 12
LAUNCH_TIMEOUT_S = 240




def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out_dir: Path, ckpt_dir: Path, *extra: str) -> tuple[int, str, float]:
    """Launch 2 CPU ranks; returns (exit code, combined output, seconds)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "--monitor-interval", "0.2",
        str(WORKER), "--out-dir", str(out_dir), "--ckpt-dir", str(ckpt_dir), *RECIPE, *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s:\n{output[-6000:]}")
    return proc.returncode, output, time.monotonic() - start


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-rank run; its output directory."""
    root = tmp_path_factory.mktemp("ddp_ok")
    code, output, _ = _torchrun(root / "out", root / "ckpt")
    assert code == 0, output[-6000:]
    return root


def test_ddp_run_finishes_with_identical_ranks(ddp_reference: Path) -> None:
    out = ddp_reference / "out"
    state0 = torch.load(out / "rank0.pt", weights_only=True)
    state1 = torch.load(out / "rank1.pt", weights_only=True)
    assert _equal_states(state0, state1)  # parameters *and* BN buffers
    res0 = json.loads((out / "result0.json").read_text())
    res1 = json.loads((out / "result1.json").read_text())
    assert res0["step"] == res1["step"] == DDP_STEPS
    hist = res0["history"]
    assert len(hist) == 2 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    # losses and validation counts are all-reduced: both ranks report the same numbers
    assert [h["val_top1"] for h in hist] == [h["val_top1"] for h in res1["history"]]
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in res1["history"]]
    ckpt = load_checkpoint(ddp_reference / "ckpt" / CHECKPOINT_NAME)
    assert ckpt["world_size"] == 2 and ckpt["complete"] and ckpt["global_step"] == DDP_STEPS
    assert _equal_states(ckpt["model"], state0)


def _fail_run(root: Path) -> tuple[int, str, float]:
    return _torchrun(root / "out", root / "ckpt", "--fail-rank", "1", "--fail-at-step", "9",
                     "--dist-timeout", "60")


def _assert_failed_cleanly(code: int, output: str, seconds: float, ckpt_dir: Path) -> dict:
    assert code != 0
    assert seconds < LAUNCH_TIMEOUT_S
    assert "injected failure on rank 1 at global step 9" in output
    assert "ChildFailedError" in output or "FAILED" in output
    ckpt = load_checkpoint(ckpt_dir / CHECKPOINT_NAME)
    # every=2: step 8 was saved (rank 0 reached step 9's all-reduce, so the save finished)
    assert ckpt["global_step"] == 8 and ckpt["world_size"] == 2 and not ckpt["complete"]
    return ckpt


def test_ddp_worker_failure_is_bounded_and_resumable_single_process(tmp_path: Path) -> None:
    code, output, seconds = _fail_run(tmp_path)
    ckpt = _assert_failed_cleanly(code, output, seconds, tmp_path / "ckpt")
    assert len(ckpt["history"]) == 1  # epoch 1 finished under DDP

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, result = toy.train_toy(ckpt_dir=tmp_path / "ckpt", epochs=2, n_train=192, batch_size=16,
                                      checkpoint_every=2)
    finally:
        torch.set_num_threads(before)
    # one rank, 16 per step: 12 steps per epoch.  Step 8 of the DDP run consumed 64 samples
    # of epoch 2, which a single process resumes at its step 12 + 4.
    assert result["resumed_from"] == 16 and result["step"] == 24
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["history"][0] == ckpt["history"][0]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert result["history"][1]["train_loss"] < result["history"][0]["train_loss"]


@pytest.mark.slow
def test_ddp_resume_after_failure_is_bit_exact(tmp_path: Path, ddp_reference: Path) -> None:
    code, output, seconds = _fail_run(tmp_path)
    _assert_failed_cleanly(code, output, seconds, tmp_path / "ckpt")
    code, output, _ = _torchrun(tmp_path / "out2", tmp_path / "ckpt")
    assert code == 0, output[-6000:]
    assert "resumed from" in output
    ref = torch.load(ddp_reference / "out" / "rank0.pt", weights_only=True)
    for rank in (0, 1):
        assert _equal_states(torch.load(tmp_path / "out2" / f"rank{rank}.pt", weights_only=True), ref)


@pytest.mark.slow
def test_ddp_hung_rank_times_out(tmp_path: Path) -> None:
    """A rank that stops responding turns into an error after the process-group timeout."""
    code, output, seconds = _torchrun(tmp_path / "out", tmp_path / "ckpt", "--hang-rank", "1",
                                      "--hang-at-step", "5", "--dist-timeout", "8")
    assert code != 0
    assert "rank 1 now hangs" in output
    assert "collective operation failed" in output
    assert seconds < 120
    assert load_checkpoint(tmp_path / "ckpt" / CHECKPOINT_NAME)["global_step"] == 4
