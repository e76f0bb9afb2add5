"""Caches the benchmark's EfficientNet-Lite0 split (300 calibration / 1000 report images) for lite_skip_ablation.py."""
import sys, torch
from pathlib import Path
from torch.utils.data import DataLoader
from convfx import zoo
from convfx.data import imagenet, split_dataset
root = Path("/work/shared/data/imagenet-val-1300")
m = zoo.efficientnet_lite0(pretrained=True)
data = imagenet(root, "val", zoo.normalization_of(m), class_list=root / "wnids.txt")
c, t = split_dataset(data, [300, len(data) - 300], seed=0)
xc = torch.cat([x for x, _ in DataLoader(c, batch_size=100)])
xt, yt = zip(*DataLoader(t, batch_size=100))
torch.save({"xc": xc, "xt": torch.cat(xt), "yt": torch.cat(yt)}, sys.argv[1])
print(xc.shape, len(yt))
