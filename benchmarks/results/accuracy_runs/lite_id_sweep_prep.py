import json, sys
from pathlib import Path
import torch
from PIL import Image
from convfx import zoo
from convfx.data import imagenet_transform
root = Path(__file__).parent / "data"
tf = imagenet_transform("val", zoo.LITE_NORMALIZATION)
rows = json.loads((root / "list.json").read_text())
xs = {"calib": [], "test": []}
ys = {"calib": [], "test": []}
for name, y, part in rows:
    xs[part].append(tf(Image.open(root / name).convert("RGB")))
    ys[part].append(y)
torch.save({"xc": torch.stack(xs["calib"]), "xt": torch.stack(xs["test"]), "yt": torch.tensor(ys["test"])}, sys.argv[1])
print("prepared", len(xs["calib"]), len(xs["test"]))
