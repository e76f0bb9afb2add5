"""Run convfx over torchvision classification models: trace, full-rank exactness, reductions, time.

For each model (random init, eval mode, small input): trace ok?; convs found / factorized /
skipped (with reasons); full-rank Tucker output vs eager (float64); conv-MAC reduction at
rank="vbmf" and at flops_target=0.5; seconds. Anything other than success or a ConvfxError
naming the module is a failure of convfx, and is reported as such.

    python benchmarks/coverage.py --out benchmarks/results/coverage.md            # every builder
    python benchmarks/coverage.py --models resnet18,mobilenet_v3_small --out /tmp/c.md
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

import convfx  # noqa: E402

SIZES = {"inception_v3": 75, "googlenet": 64}
# Models that need their declared input size (fixed positional embeddings).
FIXED = ("vit_", "swin_", "maxvit_")


def _input_size(name: str) -> int:
    if name.startswith(FIXED):
        return 224
    return SIZES.get(name, 64)


def run_one(name: str) -> dict[str, object]:
    row: dict[str, object] = {"model": name}
    t0 = time.perf_counter()
    try:
        kw = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        model = torchvision.models.get_model(name, weights=None, **kw).eval()
        size = _input_size(name)
        x = torch.randn(1, 3, size, size)
        n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        row["convs"] = n_convs
        model64, x64 = model.double(), x.double()
        gm = convfx.compress(model64, x64, method="tucker", rank=1.0)
        rep = gm.convfx_report
        row["trace"] = "ok" + (" (leaf fallbacks)" if rep.notes else "")
        row["factorized"] = len(rep.factorized)
        reasons = collections.Counter((r.skipped or "").split(" (")[0] for r in rep.skipped)
        row["skipped"] = "; ".join(f"{n} {k}" for k, n in reasons.most_common())
        with torch.no_grad():
            ref, out = model64(x64), gm(x64)
        err = float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-30))
        row["exact"] = "yes" if err < 1e-8 else f"NO ({err:.1e})"
        model32 = model.float()
        g1 = convfx.compress(model32, x, rank="vbmf")
        row["vbmf"] = f"{g1.convfx_report.conv_reduction:.2f}x"
        g2 = convfx.compress(model32, x, flops_target=0.5)
        row["target_0.5"] = f"{g2.convfx_report.conv_reduction:.2f}x"
        row["status"] = "ok"
    except convfx.ConvfxError as err:
        row["status"] = f"refused: {str(err).splitlines()[0][:120]}"
    except Exception as err:  # noqa: BLE001 - a convfx bug: record it, keep going
        row["status"] = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        traceback.print_exc()
    row["seconds"] = f"{time.perf_counter() - t0:.1f}"
    return row


COLS = ["model", "status", "trace", "convs", "factorized", "skipped", "exact", "vbmf", "target_0.5", "seconds"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated subset (default: every classification builder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [m for m in args.models.split(",") if m] or sorted(torchvision.models.list_models(module=torchvision.models))
    rows = []
    for name in names:
        rows.append(run_one(name))
        print(" | ".join(str(rows[-1].get(c, "-")) for c in COLS), flush=True)
    ok = sum(r["status"] == "ok" for r in rows)
    refused = sum(str(r["status"]).startswith("refused") for r in rows)
    failed = len(rows) - ok - refused
    mismatches = sum(str(r.get("exact", "")).startswith("NO") for r in rows)
    summary = (f"{len(rows)} models: {ok} compressed (exactness checked at full rank), {refused} refused with "
               f"ConvfxError, {failed} failed otherwise; {mismatches} full-rank mismatches.")
    print(summary)
    if args.out is not None:
        cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
        lines = ["# convfx coverage over torchvision classification models", "", f"Command: `{cmd}`", "",
                 f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                 f"torchvision {torchvision.__version__}. Random init, eval mode; input 1x3xSxS with S=64 "
                 "(224 for ViT/Swin/MaxViT, 75 for Inception-v3). Exactness: full-rank Tucker/SVD in float64, "
                 "max |diff| / max |ref| < 1e-8.", "", summary, "",
                 "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
        lines += ["| " + " | ".join(str(r.get(c, "-")) for c in COLS) + " |" for r in rows]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0 if failed == 0 and mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
