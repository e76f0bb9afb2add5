"""The research script's flow on CIFAR-10 ResNet-20, with an equal-budget baseline.

Seed flow: Tucker-2 with VBMF ranks (data-free), then E epochs of fine-tuning on the
JPEG train split. The uncompressed model gets the same E epochs, because the JPEG
artifacts alone make any fine-tuning gain several points. Reports full-test-set top-1.

    python benchmarks/cifar_finetune.py --shared-data ../shared/data --epochs 1 \\
        --out benchmarks/results/cifar_finetune.md
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import convfx  # noqa: E402
from convfx.data import cifar10, make_loader  # noqa: E402
from convfx.zoo import cifar_resnet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared-data", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    ckpt = args.shared_data / "cifar10-resnet" / "resnet20-12fca82f.th"
    base = cifar_resnet(20, checkpoint=ckpt).eval()
    jpeg = args.shared_data / "cifar10-jpeg"
    train = cifar10(jpeg / "train.zip", "train", base, train_augment=True)
    test = cifar10(jpeg / "test.zip", "test", base)
    train_loader = make_loader(train, args.batch_size, shuffle=True, workers=args.workers, seed=0)
    test_loader = make_loader(test, 500, shuffle=False, workers=args.workers)
    x = torch.randn(1, 3, 32, 32)

    rows = []
    before = convfx.evaluate(base, test_loader, progress=False)
    rows.append(("original (pretrained)", convfx.analyze(base, x).conv_macs, before, 0))

    tucker = convfx.compress(base, x, method="tucker", rank="vbmf")
    rep = tucker.convfx_report
    print(rep.to_table())
    tucker_0 = convfx.evaluate(tucker, test_loader, progress=False)
    rows.append(("tucker+vbmf, no fine-tuning", rep.conv_macs_after, tucker_0, 0))

    def tune(model: torch.nn.Module) -> dict:
        convfx.finetune(model, train_loader, None, epochs=args.epochs, lr=args.lr, schedule="cosine",
                        max_steps_per_epoch=args.max_steps, progress=False, seed=0)
        return convfx.evaluate(model, test_loader, progress=False)

    t0 = time.time()
    base_ft = tune(copy.deepcopy(base))
    t_base = time.time() - t0
    rows.append((f"original + {args.epochs} epoch(s) fine-tuning (baseline)", rows[0][1], base_ft, t_base))
    t0 = time.time()
    tucker_ft = tune(tucker)
    rows.append((f"tucker+vbmf + {args.epochs} epoch(s) fine-tuning", rep.conv_macs_after, tucker_ft,
                 time.time() - t0))

    head = "| model | conv MACs | conv GFLOPs (2xMACs) | top-1 | top-5 | fine-tune s |\n|---|---|---|---|---|---|"
    lines = [f"| {n} | {m / 1e6:.2f}M | {2 * m / 1e9:.4f} | {r['top1']:.2f} | {r['top5']:.2f} | {s:.0f} |"
             for n, m, r, s in rows]
    table = "\n".join([head] + lines)
    print(table)
    if args.out is not None:
        cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
        text = "\n".join([
            "# CIFAR-10 ResNet-20: the seed flow (Tucker-2 + VBMF, then fine-tuning) vs an equal-budget baseline",
            "", f"Command: `{cmd}`", "",
            f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
            f"load average at end {os.getloadavg()[0]:.1f}; wall {time.time() - t_start:.0f} s.", "",
            "Top-1/top-5 on all 10,000 JPEG test images; fine-tuning on the 50,000-image JPEG train split "
            f"(SGD momentum 0.9, lr {args.lr}, cosine, batch {args.batch_size}, random crop + flip). "
            "MACs: 1 multiply-add = 1 (fvcore).", "",
            table, "", f"Conv-MAC reduction of tucker+vbmf: {rep.conv_reduction:.2f}x", "",
            "```", json.dumps({"vbmf_ranks": {r.fqn: r.ranks for r in rep.factorized}}), "```",
        ])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
