"""The ``convfx`` command line, end to end on a tiny generated image folder."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from convfx import serialize
from convfx.cli import main, parse_rank, parse_shape

CLASSES = ("cat", "dog", "frog")
# Small, fast and deterministic: one thread (much faster on busy CI machines), tiny batches.
COMMON = ["--workers", "0", "--batch-size", "4", "-q"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{train,test}/<class>/<n>.png with random 32x32 RGB images."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("test", 3)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def full_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One complete ``convfx decomp`` (evaluate, CP-decompose, save, fine-tune 1 epoch, evaluate)."""
    out = tmp_path_factory.mktemp("run")
    capture = tmp_path_factory.mktemp("log") / "stdout.txt"
    argv = ["decomp", "-p", str(data_root), "--arch", "cifar_resnet20", "--weights", "DEFAULT", "-d", "cp",
            "--rank", "4", "--epochs", "1", "--lr", "0.01", "--out", str(out), *COMMON]
    from contextlib import redirect_stdout

    with open(capture, "w") as f, redirect_stdout(f):
        code = main(argv)
    assert code == 0
    return out, capture.read_text()


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _col(results: dict, name: str) -> dict:
    return next(c for c in results["table"] if c["name"] == name)


# ----------------------------------------------------------------------------- decomp
def test_decomp_full_flow(full_run: tuple[Path, str]) -> None:
    out, stdout = full_run
    for name in ("decomposed.pt", "finetuned_state_dict.pt", "report.txt", "report.json", "results.json",
                 "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    for label in ("original", "decomposed", "fine-tuned", "top-1 (%)", "top-5 (%)", "conv GMACs",
                  "conv GFLOPs (2xMACs)", "params (M)", "1 multiply-add = 1"):
        assert label in stdout
    res = _results(out)
    orig, dec, fin = (_col(res, n) for n in ("original", "decomposed", "fine-tuned"))
    assert dec["conv_macs"] < orig["conv_macs"] and dec["params"] < orig["params"]
    assert fin["n"] == 9 and res["finetune"]["step"] == 3
    model = serialize.load(out / "decomposed.pt", state_dict=out / "finetuned_state_dict.pt")
    assert model.convfx_arch == "cifar_resnet20"
    assert "layer3.2.conv2" in (out / "report.txt").read_text()


@pytest.mark.parametrize("reuse", [False, True], ids=["compress", "reuse-m"])
def test_decomp_evaluate_only(full_run: tuple[Path, str], data_root: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str], reuse: bool) -> None:
    first, _ = full_run
    argv = ["decomp", "-p", str(data_root), "-v", "--out", str(tmp_path), *COMMON]
    if reuse:  # -m skips decomposition; -s puts the fine-tuned weights in
        argv += ["-m", str(first / "decomposed.pt"), "-s", str(first / "finetuned_state_dict.pt")]
    else:
        argv += ["--arch", "cifar_resnet20", "--weights", "DEFAULT", "-d", "tucker", "--flops-target", "0.5",
                 "--calibrate", "2"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "fine-tuned" not in stdout.split("top-1 (%)")[0]  # no third column
    assert not (tmp_path / "finetuned_state_dict.pt").exists()
    res = _results(tmp_path)
    names = [c["name"] for c in res["table"]]
    assert names == ["original", "decomposed"]
    if reuse:
        assert not (tmp_path / "decomposed.pt").exists()
        assert _col(res, "original")["top1"] is None  # not evaluated; MACs come from the stored report
        assert _col(res, "decomposed")["top1"] == _col(_results(first), "fine-tuned")["top1"]
    else:
        assert (tmp_path / "decomposed.pt").is_file()
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["conv_macs_after"] <= 0.5 * report["conv_macs_before"]
        assert {r["fit"] for r in report["layers"] if r["method"]} == {"data"}


@pytest.mark.parametrize("how", ["folder", "last.pt", "renamed"])
def test_decomp_resume(full_run: tuple[Path, str], data_root: Path, tmp_path: Path, how: str) -> None:
    first, _ = full_run
    ckpt = first / "checkpoints" / "last.pt"
    source = {"folder": ckpt.parent, "last.pt": ckpt}.get(how)
    if source is None:
        source = tmp_path / "saved-step3.pt"
        shutil.copyfile(ckpt, source)
    out = tmp_path / "out"
    argv = ["decomp", "-p", str(data_root), "-m", str(first / "decomposed.pt"), "-r", str(source),
            "--epochs", "1", "--lr", "0.01", "--out", str(out), *COMMON]
    assert main(argv) == 0
    res = _results(out)
    assert res["finetune"]["resumed_from"] == 3  # the finished run: nothing left to do
    a = torch.load(first / "finetuned_state_dict.pt", weights_only=True)
    b = torch.load(out / "finetuned_state_dict.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_resume_with_other_settings_is_a_clear_error(full_run: tuple[Path, str], data_root: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = full_run
    argv = ["decomp", "-p", str(data_root), "-m", str(first / "decomposed.pt"), "-r",
            str(first / "checkpoints"), "--epochs", "2", "--out", str(tmp_path), *COMMON]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("convfx: error:") and "different configuration" in err and "Traceback" not in err


# ------------------------------------------------------------------ other subcommands
def test_compress_report_and_eval(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r20-svd.pt"
    assert main(["compress", "--arch", "cifar_resnet20", "--weights", "DEFAULT", "-d", "svd", "--rank", "0.5",
                 "-o", str(path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "conv GFLOPs (2xMACs)" in out and str(path) in out
    assert serialize.load(path).convfx_arch == "cifar_resnet20"

    assert main(["report", str(path), "-q"]) == 0
    assert "layer3.2.conv2" in capsys.readouterr().out
    assert main(["report", str(path), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "svd"

    assert main(["eval", "-p", str(data_root), "-m", str(path), *COMMON]) == 0
    out = capsys.readouterr().out
    assert "r20-svd.pt" in out and "top-1 (%)" in out and "on 9 validation images" in out
    assert main(["eval", "-p", str(data_root), "--arch", "cifar_resnet20", "--weights", "DEFAULT", *COMMON]) == 0
    assert "cifar_resnet20" in capsys.readouterr().out


def test_report_of_an_architecture_without_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--arch", "cifar_resnet20", "--rank", "0.5", "--max-rows", "3", "-q"]) == 0
    out = capsys.readouterr().out
    assert "cifar_resnet20 compressed with tucker, rank 0.5" in out and "..." in out
    assert main(["report", "--arch", "cifar_resnet20", "--flops-target", "0.5", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["conv_macs_after"] <= 0.5 * report["conv_macs_before"]
    assert main(["report", "--arch", "cifar_resnet20", "-d", "auto", "--flops-target", "0.5", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["conv_macs_after"] <= 0.5 * report["conv_macs_before"]
    assert {row["method"] for row in report["layers"] if row["ranks"]} <= {"tucker", "cp"}


def test_finetune_subcommand(full_run: tuple[Path, str], data_root: Path, tmp_path: Path) -> None:
    first, _ = full_run
    argv = ["finetune", "-p", str(data_root), "-m", str(first / "decomposed.pt"), "--epochs", "1",
            "--max-steps", "1", "--out", str(tmp_path), *COMMON]
    assert main(argv) == 0
    assert (tmp_path / "finetuned_state_dict.pt").is_file()
    assert _results(tmp_path)["finetune"]["step"] == 1


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv", [
    ["decomp", "--bogus"],
    ["decomp", "--arch", "resnet18"],  # -p is required
    ["compress", "--rank", "banana"],
    ["compress", "--rank", "1.5"],
    ["compress", "--flops-target", "2"],
    ["compress", "--latency-target", "0"],
    ["compress", "--latency-backend", "tvm"],
    ["compress", "--distill-steps", "-3"],
    ["report", "--input-shape", "3,x"],
    ["decomp", "-p", "data", "-d", "qr"],
    ["eval", "-p", "data", "--batch-size", "0"],
    ["frobnicate"],
    [],
])
def test_bad_flags_give_usage_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: convfx" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "-p", "{tmp}/missing", "--arch", "cifar_resnet20"], "dataset path not found"),
    (["eval", "-p", "{data}", "--arch", "resnet5O"], "unknown architecture 'resnet5O'; did you mean"),
    (["eval", "-p", "{data}", "-m", "{tmp}/garbage.pt"], "corrupted"),
    (["compress", "--arch", "cifar_resnet20", "--weights", "{tmp}/nope.pth"], "not found"),
    (["report", "{tmp}/garbage.pt", "--arch", "resnet18"], "either a saved MODEL"),
    (["report", "--arch", "cifar_resnet20", "--rank", "4", "--flops-target", "0.5"], "not both"),
    (["compress", "--arch", "cifar_resnet20", "-d", "auto"], "'auto' chooses each layer's structure"),
    (["compress", "--arch", "cifar_resnet20", "-d", "id", "--flops-target", "0.7"], "method='id' refits"),
    (["decomp", "-p", "{data}", "--arch", "cifar_resnet20", "--dataset", "imagefolder-classlist"],
     "needs --class-list"),
    (["decomp", "-p", "{data}", "--arch", "cifar_resnet20", "-d", "tucker", "--refine-steps", "10", "-v"],
     "refine_steps: only method='id'"),
    (["compress", "--arch", "cifar_resnet20", "--latency-target", "0.5", "--flops-target", "0.5"],
     "latency_target: pass either flops_target or latency_target"),
    (["compress", "--arch", "cifar_resnet20", "--distill-steps", "10", "--flops-target", "0.5"],
     "distill_steps: distillation trains on unlabeled inputs"),
    (["compress", "--arch", "cifar_resnet20", "--weights", "DEFAULT", "--calibration", "{tmp}/missing",
      "--flops-target", "0.5"],
     "dataset path not found"),
])
def test_library_errors_are_one_clear_line(argv: list[str], message: str, data_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"definitely not a checkpoint" * 20)
    argv = [a.format(tmp=tmp_path, data=data_root) for a in argv] + ["-q"]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # default output paths land here
    assert main(argv) == 2
    assert not any(work.iterdir()), "a failed command left files behind"
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("convfx: error: ") and message in lines[0], err
    assert "Traceback" not in err and len(lines) <= 2  # the error, and at most a hint


@pytest.mark.parametrize("command,flag,value", [
    *(("decomp", "--lr", v) for v in ("inf", "nan", "1e999", "-0.1", "0")),
    *(("finetune", "--lr", v) for v in ("inf", "-inf", "nan")),
    ("decomp", "--flops-target", "nan"), ("decomp", "--flops-target", "inf"),
])
def test_float_flags_refuse_non_finite_numbers(command: str, flag: str, value: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = [command, "-p", "data", "-m", "model.pt", f"{flag}={value}", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a" in err and repr(value) in err, err
    assert "Traceback" not in err


def test_report_json_honours_max_rows(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["report", "--arch", "cifar_resnet20", "--weights", "DEFAULT", "--rank", "0.5", "--json", "-q"]
    assert main(argv) == 0
    full = json.loads(capsys.readouterr().out)
    assert "layers_omitted" not in full
    n = len(full["layers"])
    assert main([*argv, "--max-rows", "3"]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["layers"] == full["layers"][:3] and cut["layers_omitted"] == n - 3
    assert {k: v for k, v in cut.items() if k not in ("layers", "layers_omitted", "seconds")} == \
        {k: v for k, v in full.items() if k not in ("layers", "seconds")}
    assert main([*argv, "--max-rows", str(n + 5)]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["layers"] == full["layers"] and whole["layers_omitted"] == 0
    assert main(["report", "--help"]) == 0
    assert "layers_omitted" in " ".join(capsys.readouterr().out.split())


_RANDOM = "no --weights given: {arch} has random weights"


def test_compress_without_weights_warns_that_they_are_random(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    note = _RANDOM.format(arch="cifar_resnet20")
    path = tmp_path / "random.pt"
    assert main(["compress", "--arch", "cifar_resnet20", "-o", str(path), "-q"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {note}" in out and f"WARNING: {note}" in err and path.is_file()
    assert main(["compress", "--arch", "cifar_resnet20", "--weights", "DEFAULT", "-o", str(path), "-q"]) == 0
    assert "random weights" not in "".join(capsys.readouterr())
    # report --arch: the warning on stderr, and the JSON on stdout stays JSON
    assert main(["report", "--arch", "cifar_resnet20", "--json", "-q"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["layers"] and f"WARNING: {note}" in err
    assert main(["report", "--arch", "cifar_resnet20", "-q"]) == 0
    assert f"warning: {note}" in capsys.readouterr().out


def test_decomp_without_weights_warns_that_they_are_random(data_root: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["decomp", "-p", str(data_root), "--arch", "cifar_resnet20", "-d", "tucker", "--rank", "0.5", "-v",
            "--out", str(tmp_path), *COMMON]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    note = _RANDOM.format(arch="cifar_resnet20")
    assert f"warning: {note}" in out and f"WARNING: {note}" in err
    from convfx import zoo

    state = tmp_path / "weights.pt"
    torch.save(zoo.demo_model().state_dict(), state)
    assert main([*argv, "-s", str(state)]) == 0  # weights from -s: not random
    assert "random weights" not in "".join(capsys.readouterr())


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "-p", str(tmp_path / "missing"), "--arch", "cifar_resnet20", "--debug", "-q"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "convfx: error: dataset path not found" in err


@pytest.mark.parametrize("text, expected", [
    ("vbmf", "vbmf"), ("energy:0.9", "energy:0.9"), ("8", 8), ("0.5", 0.5), ("16,8", (16, 8)), ("1.0", 1.0),
])
def test_parse_rank(text: str, expected: object) -> None:
    assert parse_rank(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "energy:2", "1,2,3", "svd", ""])
def test_parse_rank_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rank(text)


def test_parse_shape() -> None:
    assert parse_shape("1,3,224,224") == parse_shape("1x3x224x224") == (1, 3, 224, 224)


# ------------------------------------------------------------------ real processes
@pytest.mark.parametrize("cmd", [[sys.executable, "-m", "convfx.cli"], ["convfx"]], ids=["python-m", "script"])
def test_help_in_a_subprocess(cmd: list[str]) -> None:
    if cmd == ["convfx"] and shutil.which("convfx") is None:
        pytest.skip("console script not installed (pip install -e .)")
    done = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for sub in ("decomp", "compress", "eval", "finetune", "report", "demo"):
        assert sub in done.stdout



def test_usage_error_in_a_subprocess() -> None:
    bad = subprocess.run([sys.executable, "-m", "convfx.cli", "decomp", "--nonsense"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "usage: convfx decomp" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_demo_fast_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--fast", "-q"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "demo_accuracy_vs_macs.png").stat().st_size > 10_000
    assert serialize.load(tmp_path / "demo_resnet20_tucker.pt").convfx_report is not None
    assert "yes, bit for bit" in out and "top-1" in out


@pytest.mark.slow
def test_full_demo_shows_auto_ahead_of_tucker_at_the_smallest_budget(tmp_path: Path) -> None:
    """The full demo's extra row: method=auto at the same conv MACs as Tucker-2, and more accurate."""
    assert main(["demo", "--out", str(tmp_path), "-q"]) == 0
    rows = json.loads((tmp_path / "demo_results.json").read_text())["rows"]
    auto = next(r for r in rows if r["method"] == "auto")
    tucker = next(r for r in rows if r["method"] == "tucker" and r["target"] == auto["target"])
    assert auto["conv_macs"] <= auto["target"] * rows[0]["conv_macs"]
    assert auto["top1"] > tucker["top1"]
    latency = next(r for r in rows if r["label"].endswith("time"))
    assert latency["speedup"] >= 1.0  # measured, never slower than the original
    recovered = next(r for r in rows if r["label"].endswith("+ recovery"))
    assert recovered["conv_macs"] == auto["conv_macs"]


def test_compress_calibrates_on_a_folder_of_unlabeled_images(data_root: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``--calibration DIR``: any layout (here nested class folders and a loose file), no labels; with
    --distill-steps the recovery stage runs on them and the report says so."""
    shutil.copy(next((data_root / "test" / "cat").iterdir()), data_root / "train" / "loose.png")
    out = tmp_path / "m.pt"
    code = main(["compress", "--arch", "cifar_resnet20", "--weights", "DEFAULT", "--flops-target", "0.5",
                 "--calibration", str(data_root / "train"), "--distill-steps", "3", "-o", str(out), "-q"])
    (data_root / "train" / "loose.png").unlink()
    assert code == 0
    text = capsys.readouterr().out
    assert "factors fitted on 1 calibration batch(es), 13 input(s)" in text
    assert "distill: " in text
    assert serialize.load(out).convfx_report.conv_reduction >= 1.99
