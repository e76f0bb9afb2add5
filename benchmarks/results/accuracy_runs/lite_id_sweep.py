"""Sweep: method='id' (BN-scaled or not) + block-local gradient reconstruction, on cached tensors.

Archived as it ran (behind lite_id_sweep_cuda_h200.*). Not runnable against today's convfx: it sets
``convfx.api._ID_BN_SCALE`` and calls helpers of ``convfx.api`` that were removed (the BN weighting was
dropped, and method='id' moved into ``passes/narrow.py``). Check out commit 6a2a0cb to re-run it.
"""
import copy, json, os, sys, time
import torch, torch.fx as fx
import convfx
import convfx.api as api
from convfx import zoo
from passes.interp import find_chains
from passes.trace import trace

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_num_threads(int(os.environ.get("NT", "2")))
d = torch.load(os.environ["DATA"])
xc, xt, yt = d["xc"].to(dev), d["xt"].to(dev), d["yt"].to(dev)
original = zoo.efficientnet_lite0(pretrained=True).eval().to(dev)
with torch.no_grad():
    ref = torch.cat([original(xt[i:i + 100]) for i in range(0, len(xt), 100)])
    refc = torch.cat([original(xc[i:i + 100]) for i in range(0, len(xc), 100)])
OUT = os.environ.get("OUTF", "/tmp/idp/sweep.jsonl")

def kl(out, r):
    lp = torch.log_softmax(r.double(), 1)
    return float((lp.exp() * (lp - torch.log_softmax(out.double(), 1))).sum(1).mean())

def evaluate(m):
    m.eval()
    with torch.no_grad():
        out = torch.cat([m(xt[i:i + 100]) for i in range(0, len(xt), 100)])
        oc = torch.cat([m(xc[i:i + 100]) for i in range(0, len(xc), 100)])
    return {"top1": float((out.argmax(1) == yt).float().mean()) * 100, "kl": kl(out, ref), "calib_kl": kl(oc, refc)}

def sub(g0, c):
    first, last = c.first.nodes[0], c.last.nodes[0]
    path = [first]
    while path[-1] is not last:
        path.append(next(iter(path[-1].users)))
    g = fx.Graph()
    env = {first.args[0]: g.placeholder("x")}
    def arg(n):
        if n not in env:
            env[n] = g.node_copy(n)
        return env[n]
    for n in path:
        env[n] = g.node_copy(n, arg)
    g.output(env[last])
    return fx.GraphModule(g0, g)

class Stop(Exception):
    pass

def capture(m, name, x_all):
    outs = []
    class I(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if n.name == name:
                self.got = r
                raise Stop
            return r
    with torch.no_grad():
        for i in range(0, len(x_all), 50):
            it = I(m)
            try:
                it.run(x_all[i:i + 50])
            except Stop:
                outs.append(it.got)
    return torch.cat(outs)

def reconstruct(gm, steps, lr, bs, mode, post_bn, aug=False):
    xs = torch.cat([xc, xc.flip(3)]) if aug else xc
    orig_gm = trace(copy.deepcopy(original)).gm.eval()
    chains = find_chains(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    chains.sort(key=lambda c: order[c.last.nodes[0].name])
    for c in chains:
        tgt = capture(orig_gm, c.last.nodes[0].name, xs)
        if tgt.shape[1] != gm.get_submodule(c.last.fqn).weight.shape[0]:
            continue
        x_in = capture(gm, c.first.nodes[0].args[0].name, xs)
        sm = sub(gm, c)
        w = torch.ones(tgt.shape[1], device=dev)
        if post_bn:
            s = api.bn_output_scale(gm, c.last.nodes[0])
            if s is not None:
                w = s.float().to(dev)
        w = w[None, :, None, None] ** 2
        params = list(sm.parameters()) if mode == "all" else \
            [p for n, p in sm.named_parameters() if n.startswith(c.last.fqn.replace(".", "_")) or c.last.fqn in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        scale = float((tgt.pow(2) * w).mean())
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (bs,), generator=g).to(dev)
            loss = ((sm(x_in[idx]) - tgt[idx]).pow(2) * w).mean() / scale
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        for p in params:
            p.requires_grad_(False)

def emit(row):
    print(json.dumps(row), flush=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(row) + "\n")

_cache = {}

def compressed(target, bns):
    if (target, bns) not in _cache:
        api._ID_BN_SCALE = bns
        t0 = time.time()
        gm = convfx.compress(original, xc[:1], method="id", flops_target=1 / target,
                             calibration=[xc[i:i + 50] for i in range(0, len(xc), 50)], progress=False)
        rep = gm.convfx_report
        base = {"target": target, "bn_scale": bns, "compress_s": time.time() - t0,
                "reduction": rep.conv_macs_before / rep.conv_macs_after}
        _cache[target, bns] = gm, base
        emit({**base, "steps": 0, **evaluate(gm)})
    return _cache[target, bns]

def main(jobs):
    emit({"original": evaluate(original)})
    for target, bns, recons in jobs:
        gm, base = compressed(target, bns)
        for steps, lr, bs, mode, post_bn, aug in recons:
            g2 = copy.deepcopy(gm)
            t0 = time.time()
            reconstruct(g2, steps, lr, bs, mode, post_bn, aug)
            emit({**base, "steps": steps, "lr": lr, "bs": bs, "mode": mode, "post_bn": post_bn, "aug": aug,
                  "recon_s": time.time() - t0, **evaluate(g2)})
            del g2

if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
