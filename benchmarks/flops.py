"""FLOP/parameter reductions of convfx on standard CNNs (random init) and pretrained CIFAR ResNets.

Prints conv GMACs and conv GFLOPs (= 2 x GMACs, the research script's convention) before
and after, parameters before and after, and the conv-MAC reduction, for each method.

    python benchmarks/flops.py --out benchmarks/results/flops.md
    python benchmarks/flops.py --shared-data ../shared/data --out benchmarks/results/flops.md

Random-init weights are noise: VBMF correctly finds almost no structure in them, so the
"vbmf" rows on random models show maximal (meaningless) reductions. The fixed-rank rows are
the meaningful comparison there; the pretrained CIFAR rows show VBMF on real weights.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision

import convfx
from convfx.zoo import cifar_resnet

# A fixed float rank per model chosen to land near the research script's AlexNet figure
# (conv GFLOPs 1.31 -> 0.45, i.e. ~2.9x fewer conv MACs).
FIXED = {"alexnet": 0.47, "vgg16": 0.46, "resnet50": 0.33}
CP_FIXED = {"alexnet": 0.36, "vgg16": 0.33, "resnet50": 0.33}


def _row(name: str, method: str, rank: str, rep: convfx.Report, seconds: float) -> list[str]:
    return [
        name, method, rank,
        f"{rep.conv_macs_before / 1e9:.3f} → {rep.conv_macs_after / 1e9:.3f}",
        f"{2 * rep.conv_macs_before / 1e9:.3f} → {2 * rep.conv_macs_after / 1e9:.3f}",
        f"{rep.params_before / 1e6:.2f}M → {rep.params_after / 1e6:.2f}M",
        f"{rep.conv_reduction:.2f}x",
        f"{len(rep.factorized)}/{len(rep.layers)}",
        f"{seconds:.1f}",
    ]


HEAD = ["model", "method", "rank", "conv GMACs", "conv GFLOPs (2xMACs)", "params", "conv-MAC reduction",
        "layers factorized", "compress s"]


def run(models: list[tuple[str, torch.nn.Module, torch.Tensor, list[tuple[str, object]]]]) -> list[list[str]]:
    rows = []
    for name, model, x, settings in models:
        for method, rank in settings:
            t0 = time.perf_counter()
            gm = convfx.compress(model, x, method=method, rank=rank)  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
            rows.append(_row(name, method, str(rank), gm.convfx_report, dt))
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared-data", type=Path, default=None,
                    help="folder with cifar10-resnet/ (pretrained CIFAR ResNet-20/56)")
    ap.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    ap.add_argument("--models", default="alexnet,vgg16,resnet50")
    ap.add_argument("--no-cp", action="store_true", help="skip the CP rows (the slowest)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x224 = torch.randn(1, 3, 224, 224)
    models = []
    for name in [m for m in args.models.split(",") if m]:
        settings: list[tuple[str, object]] = [("tucker", "vbmf"), ("tucker", FIXED[name])]
        if not args.no_cp:
            settings.append(("cp", CP_FIXED[name]))
        models.append((name, torchvision.models.get_model(name).eval(), x224, settings))
    if args.shared_data is not None:
        x32 = torch.randn(1, 3, 32, 32)
        for depth in (20, 56):
            ckpt = args.shared_data / "cifar10-resnet" / {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}[depth]
            model = cifar_resnet(depth, checkpoint=ckpt).eval()
            models.append((f"cifar_resnet{depth} (pretrained)", model, x32,
                           [("tucker", "vbmf"), ("tucker", "energy:0.9"), ("cp", "vbmf")]))

    print(" | ".join(HEAD))
    rows = run(models)
    if args.out is not None:
        cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
        lines = [
            "# convfx FLOP reductions", "",
            f"Command: `{cmd}`", "",
            f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}. Input: 1x3x224x224 (ImageNet models, random init), "
            "1x3x32x32 (CIFAR ResNets).", "",
            "Convention: MACs count one multiply-add as 1 (fvcore). GFLOPs = 2 x GMACs, the research "
            "script's convention (its AlexNet: 1.31 -> 0.45 conv GFLOPs).", "",
            "Random-init weights are noise, so VBMF finds (correctly) almost no structure in them: "
            "those vbmf rows show how far it cuts noise, not a useful operating point. The fixed-rank "
            "rows are chosen to land near the research script's AlexNet reduction (~2.9x).", "",
            "| " + " | ".join(HEAD) + " |",
            "|" + "---|" * len(HEAD),
        ] + ["| " + " | ".join(r) + " |" for r in rows]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
