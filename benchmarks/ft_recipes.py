"""Fine-tuning recipes side by side at one compression point: which recovery closes the gap?

Issue 4's fine-tuned targets (ResNet-20 / ResNet-56 at 2.5x fewer conv MACs, within 1.0 /
0.5 of the equal-budget baseline after <= 5 epochs) are about recovery, not only about
the starting point. This script compresses each CIFAR ResNet once (convfx: calibrated
Tucker-2 + ``flops_target``, as in ``accuracy.py``) and fine-tunes copies of it with
several recipes. Each recipe's gap is measured against the uncompressed model fine-tuned
with the *same* learning rate and batch size (its equal-budget baseline, which is also
its distillation teacher), in the same run.

Recipes (``--recipes``; all: SGD nesterov, cosine, 20 warm-up steps, wd 5e-4, 5 epochs):

* ``ref``: ``accuracy.py``'s convfx+KD (lr 0.02, batch 256, KD alpha 0.9, T 4);
* ``a1``: KD only (alpha 1.0), no cross-entropy;
* ``f1`` / ``f5`` / ``f20``: plus feature distillation with that weight (every BN output
  pulled to the teacher's, ``finetune(feature_kd=)``);
* ``lr05``, ``lr05f5``: lr 0.05 (its own baseline), without / with feature distillation;
* ``b128``: batch 128 (twice the steps; its own baseline).

The first model runs every recipe; later models run ``ref`` and the ``--carry-best``
recipes with the smallest gap on the first model. With ``--jobs N`` up to N fine-tunes
run at once in separate processes (a GPU is far from busy with one CIFAR ResNet). Give
each enough loader workers: on a 16-core H200 host, 8 jobs with one worker each were
loader-bound (about 180 s per fine-tune against 25 s for one job with 12 workers).

    python benchmarks/ft_recipes.py --shared-data ../shared/data --device cuda --jobs 5 --tag cuda

MACs: fvcore, 1 multiply-add = 1, all convs, per image; GFLOPs = 2 x GMACs.
Writes ``ft_recipes_<tag>.md`` and ``.json`` to ``--out-dir`` after every phase.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import convfx
from convfx import zoo
from convfx.checkpoint import atomic_save, load_checkpoint
from convfx.train import recalibrate_bn

# accuracy.py sits beside this script (the script's folder is on sys.path when it runs)
from accuracy import CIFAR_MODELS, ImageTensors, conv_macs, decode_cifar, fmt, machine  # isort: skip

__all__ = ["RECIPES", "Recipe", "main"]

log = logging.getLogger("ft_recipes")


@dataclass(frozen=True)
class Recipe:
    lr: float = 0.02
    batch_size: int = 256
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    feature_kd: float = 0.0

    @property
    def baseline_key(self) -> str:
        return f"lr{self.lr:g}-b{self.batch_size}"


RECIPES: dict[str, Recipe] = {
    "ref": Recipe(),
    "f1": Recipe(feature_kd=1.0),
    "lr05": Recipe(lr=0.05),
    "a1": Recipe(kd_alpha=1.0),
    "f5": Recipe(feature_kd=5.0),
    "b128": Recipe(batch_size=128),
    "f20": Recipe(feature_kd=20.0),
    "lr05f5": Recipe(lr=0.05, feature_kd=5.0),
}
CKPT = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}


def _original(shared: Path, name: str) -> torch.nn.Module:
    depth = CIFAR_MODELS[name]
    return zoo.cifar_resnet(depth, checkpoint=shared / "cifar10-resnet" / CKPT[depth]).eval()


def _data(shared: Path, norm: zoo.Normalization) -> tuple[ImageTensors, ImageTensors, ImageTensors]:
    tr_x, tr_y = decode_cifar(shared / "cifar10-jpeg" / "train.zip", "train")
    te_x, te_y = decode_cifar(shared / "cifar10-jpeg" / "test.zip", "test")
    return (ImageTensors(tr_x, tr_y, norm, augment=True), ImageTensors(tr_x, tr_y, norm),
            ImageTensors(te_x, te_y, norm))


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    """One fine-tune in its own process: baseline (teacher=None) or compressed student."""
    torch.set_num_threads(spec["threads"])
    if spec["device"].startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    logging.getLogger("convfx").setLevel(logging.WARNING)
    device = torch.device(spec["device"])
    shared, name, r = Path(spec["shared"]), spec["model"], Recipe(**spec["recipe"])
    original = _original(shared, name)
    train, _, test = _data(shared, zoo.normalization_of(original))
    if spec["student"] is None:
        model: torch.nn.Module = original
        teacher = None
    else:
        model = convfx.load(spec["student"], copy.deepcopy(original))
        teacher = copy.deepcopy(original)
        teacher.load_state_dict(load_checkpoint(spec["teacher"])["state_dict"])
        teacher.eval()
    loader = DataLoader(train, batch_size=r.batch_size, shuffle=True, num_workers=spec["workers"],
                        pin_memory=device.type == "cuda", drop_last=True)
    t0 = time.perf_counter()
    convfx.finetune(model, loader, None, epochs=spec["epochs"], lr=r.lr, nesterov=True, weight_decay=5e-4,
                    warmup_steps=20, teacher=teacher, kd_alpha=r.kd_alpha, kd_temperature=r.kd_temperature,
                    feature_kd=r.feature_kd if teacher is not None else 0.0, progress=False, seed=0,
                    device=device, log_every=0, max_steps_per_epoch=spec["max_steps"])
    ft_s = time.perf_counter() - t0
    ev = convfx.evaluate(model.to(device), test.batches(1000, device), progress=False)
    if spec["save_to"]:
        atomic_save({"state_dict": model.state_dict()}, Path(spec["save_to"]))
    return {"top1": ev["top1"], "top5": ev["top5"], "ft_s": ft_s}


@dataclass
class Row:
    model: str
    recipe: str
    settings: dict[str, Any]
    baseline_top1: float | None = None
    top1: float | None = None
    top5: float | None = None
    ft_s: float | None = None

    @property
    def gap(self) -> float | None:
        return None if self.top1 is None or self.baseline_top1 is None else self.top1 - self.baseline_top1


def markdown(meta: dict[str, Any], rows: list[Row]) -> str:
    out = ["# Fine-tuning recipes at one compression point (convfx + distillation)", "",
           f"Command: `{meta['command']}`", "", f"Machine: {meta['machine']}", "",
           "MACs: fvcore, 1 multiply-add = 1, all convs, per image; GFLOPs = 2 x GMACs. Each recipe's "
           "baseline is the uncompressed model fine-tuned with the same lr and batch size for the same "
           "epochs, in this run; it is also that recipe's distillation teacher. 'gap' = student - baseline "
           "(top-1 on all 10,000 CIFAR-10 JPEG test images). One seed per cell.", ""]
    for name, info in meta["models"].items():
        out += [f"## {name}", "",
                f"Compressed once: {info['macs'] / 1e6:.2f}M conv MACs ({2 * info['macs'] / 1e9:.4f} GFLOPs), "
                f"{info['reduction']:.2f}x fewer than the original's {info['base_macs'] / 1e6:.2f}M; "
                f"calibration-only top-1 {info['calib_top1']:.2f} (original {info['original_top1']:.2f}); "
                f"compression {info['compress_s']:.1f} s.", "",
                "| recipe | lr | batch | KD alpha | T | feature KD | baseline FT | student FT | gap | FT s |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.model != name:
                continue
            s = r.settings
            out.append(f"| {r.recipe} | {s['lr']:g} | {s['batch_size']} | {s['kd_alpha']:g} | {s['kd_temperature']:g}"
                       f" | {s['feature_kd']:g} | {fmt(r.baseline_top1)} | {fmt(r.top1)} | "
                       f"{'–' if r.gap is None else f'{r.gap:+.2f}'} | {fmt(r.ft_s)} |")
        out.append("")
    out += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("convfx").setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--shared-data", type=Path, required=True)
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--target", type=float, default=2.5, help="conv-MAC reduction")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--carry-best", type=int, default=2, help="recipes besides ref for the later models")
    ap.add_argument("--calib-images", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="fine-tunes at once, each in its own process")
    ap.add_argument("--workers", type=int, default=2, help="loader workers per fine-tune")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per fine-tune")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; later phases are skipped")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or "ref" not in names:
        ap.error(f"--recipes: unknown {unknown} (known: {list(RECIPES)}); 'ref' is required")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if any(m not in CIFAR_MODELS for m in models):
        ap.error(f"--models: choose from {list(CIFAR_MODELS)}")
    torch.manual_seed(0)
    device = torch.device(a.device)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"command": "python " + " ".join(["benchmarks/ft_recipes.py", *argv]),
                            "machine": machine(device), "models": {}, "notes": []}
    rows: list[Row] = []
    t_start = time.perf_counter()

    def flush() -> None:
        (a.out_dir / f"ft_recipes_{a.tag}.json").write_text(
            json.dumps({**meta, "rows": [asdict(r) | {"gap": r.gap} for r in rows]}, indent=1))
        (a.out_dir / f"ft_recipes_{a.tag}.md").write_text(markdown(meta, rows))

    def over() -> bool:
        return a.time_budget is not None and time.perf_counter() - t_start > a.time_budget

    base = {"shared": str(a.shared_data), "device": a.device, "threads": a.threads, "workers": a.workers,
            "epochs": a.epochs, "max_steps": a.max_steps}
    work = Path(tempfile.mkdtemp(prefix="ft_recipes_"))
    pool = ProcessPoolExecutor(max_workers=a.jobs, mp_context=get_context("spawn"))
    try:
        for mi, name in enumerate(models):
            if over():
                meta["notes"].append(f"{name}: not run (time budget reached)")
                break
            if mi > 0:  # ref + the best recipes of the first model
                first = sorted((r for r in rows if r.model == models[0] and r.recipe != "ref"
                                and r.gap is not None), key=lambda r: -r.gap)  # type: ignore[operator]
                names = ["ref", *[r.recipe for r in first[:a.carry_best]]]
            original = _original(a.shared_data, name).to(device)
            _, plain, test = _data(a.shared_data, zoo.normalization_of(original))
            idx = torch.randperm(len(plain), generator=torch.Generator().manual_seed(0))[:a.calib_images]
            calib = [x for x, _ in plain.batches(100, device, idx)]
            example = torch.zeros(1, 3, 32, 32, device=device)
            base_macs = conv_macs(original, example)
            t0 = time.perf_counter()
            student = convfx.compress(original, example, method="tucker", flops_target=1 / a.target,
                                      calibration=calib, progress=False)
            recalibrate_bn(student, calib, len(calib))
            comp_s = time.perf_counter() - t0
            macs = conv_macs(student, example)
            ev_o = convfx.evaluate(original, test.batches(1000, device), progress=False)
            ev_c = convfx.evaluate(student, test.batches(1000, device), progress=False)
            student_path = work / f"{name}-student.pt"
            convfx.save(student, student_path)
            meta["models"][name] = {"base_macs": base_macs, "macs": macs, "reduction": base_macs / macs,
                                    "calib_top1": ev_c["top1"], "original_top1": ev_o["top1"],
                                    "compress_s": comp_s}
            log.info("%s: %.2fx, calibration-only %.2f", name, base_macs / macs, ev_c["top1"])
            flush()
            keys = list(dict.fromkeys(RECIPES[n].baseline_key for n in names))
            futs = {k: pool.submit(_job, {**base, "model": name, "student": None, "teacher": None,
                                          "recipe": asdict(next(RECIPES[n] for n in names
                                                                if RECIPES[n].baseline_key == k)),
                                          "save_to": str(work / f"{name}-{k}.pt")}) for k in keys}
            baselines = {k: f.result() for k, f in futs.items()}
            for k, b in baselines.items():
                log.info("%s baseline %s: %.2f (%.0f s)", name, k, b["top1"], b["ft_s"])
            if over():
                meta["notes"].append(f"{name}: students not run (time budget reached after the baselines)")
                for n in names:
                    rows.append(Row(name, n, asdict(RECIPES[n]), baselines[RECIPES[n].baseline_key]["top1"]))
                flush()
                break
            sfuts = {n: pool.submit(_job, {**base, "model": name, "student": str(student_path),
                                           "teacher": str(work / f"{name}-{RECIPES[n].baseline_key}.pt"),
                                           "recipe": asdict(RECIPES[n]), "save_to": ""}) for n in names}
            for n, f in sfuts.items():
                out = f.result()
                row = Row(name, n, asdict(RECIPES[n]), baselines[RECIPES[n].baseline_key]["top1"],
                          out["top1"], out["top5"], out["ft_s"])
                rows.append(row)
                log.info("%s %s: %.2f (gap %+.2f, %.0f s)", name, n, row.top1, row.gap, row.ft_s)
            flush()
    finally:
        pool.shutdown(cancel_futures=True)
    meta["notes"].append(f"wall time {time.perf_counter() - t_start:.0f} s; {a.jobs} fine-tune(s) at once, "
                         f"{a.workers} loader workers and {a.threads} threads each")
    flush()
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
