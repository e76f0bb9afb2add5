"""Archived prototype (2026-11-28, eleventh session) behind lite_skip_ablation_cpu.jsonl; kept as it ran.

Not runnable against today's convfx: it sets module globals (``convfx.api.SKIP_TARGETS``,
``REFIT_FULL``) that were removed when compress became a pipeline of passes. Check out commit 5bb331a to
re-run it; today the switch is ``convfx.api.compress_with(model, x, CompressOptions(..., skip_targets=False))``.

EfficientNet-Lite0 at 1.3x, method="id", 300 calibration / 1000 report images (the benchmark's split,
cached by lite_skip_ablation_prep.py into /tmp/exp/data.pt), 2 threads of the 2-core CPU. Arguments are
CALIB:STEPS specs ("300", "600flip", "1200rrc0.25" = the 300 images plus 3 random-resized-crop copies).
SKIP=0/1 toggles convfx.api.SKIP_TARGETS; the first two rows ran before it existed (code at c063dbc).
FULL=1 switched on an uncommitted variant (REFIT_FULL: also refit the chains the allocation kept at full
width) that was dropped: +0.2 top-1, KL 0.162 -> 0.160. Without that variant the assignment does nothing.
"""
import json, os, sys, time, torch
import torchvision.transforms as T
import convfx, convfx.api as api
api.SKIP_TARGETS = os.environ.get('SKIP', '1') == '1'
api.REFIT_FULL = os.environ.get('FULL', '0') == '1'
from convfx import zoo
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
d = torch.load("/tmp/exp/data.pt")
xc, xt, yt = d["xc"], d["xt"], d["yt"]
original = zoo.efficientnet_lite0(pretrained=True).eval()
with torch.no_grad():
    ref = torch.cat([original(xt[i:i + 100]) for i in range(0, len(xt), 100)])
print("base", float((ref.argmax(1) == yt).float().mean()) * 100, flush=True)
def ev(gm):
    with torch.no_grad():
        out = torch.cat([gm(xt[i:i + 100]) for i in range(0, len(xt), 100)])
    lp = torch.log_softmax(ref.double(), 1)
    return float((out.argmax(1) == yt).float().mean()) * 100, float((lp.exp() * (lp - torch.log_softmax(out.double(), 1))).sum(1).mean())
def make(kind):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "300": return xc
    if kind == "600flip": return torch.cat([xc, xc.flip(3)])
    n, scale = kind.split("rrc")
    rrc = T.Compose([T.RandomResizedCrop(224, scale=(float(scale), 1.0), antialias=True), T.RandomHorizontalFlip()])
    return torch.cat([xc] + [torch.stack([rrc(x) for x in xc]) for _ in range(int(n) // 300 - 1)])
target = float(os.environ.get("TARGET", "1.3"))
for spec in sys.argv[1:]:
    kind, steps = spec.split(":")
    cal = make(kind)
    t0 = time.time()
    gm = convfx.compress(original, xc[:1], method="id", flops_target=1 / target, calibration=[cal[i:i + 50] for i in range(0, len(cal), 50)], refine_steps=int(steps), progress=False)
    top1, kl = ev(gm)
    r = {"skip": api.SKIP_TARGETS, "full": api.REFIT_FULL, "target": target, "calib": kind, "steps": int(steps), "top1": top1, "kl": kl, "s": round(time.time() - t0)}
    print(json.dumps(r), flush=True)
    with open("/tmp/exp/res.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")
