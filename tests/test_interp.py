"""method="id": data-aware interpolative decomposition of inverted-residual hidden channels."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import convfx
from passes.errors import ConvfxError
from passes.flops import annotate_macs, propagate_shapes
from passes.interp import (Chain, chain_graph, chain_moments, find_chains, greedy_order, prune_chain, refine_chain,
                           refit, refit_residual, skip_join)
from passes.trace import trace


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass that pads in forward, as EfficientNet-Lite's code does (traced as F.conv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0] // 2
        return F.conv2d(F.pad(x, (k, k, k, k)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Block(nn.Module):
    """Inverted residual; with ``out`` != ``c`` it has no skip (as a stage's first block)."""

    def __init__(self, c: int, e: int, k: int, functional: bool, out: int | None = None) -> None:
        super().__init__()
        conv = SamePadConv if functional else nn.Conv2d
        h, out = c * e, out or c
        self.skip = out == c
        self.expand = conv(c, h, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(h)
        self.act = nn.ReLU6()
        self.dw = conv(h, h, k, padding=0 if functional else k // 2, groups=h, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.project = conv(h, out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.project(self.act(self.bn1(self.dw(self.act(self.bn0(self.expand(x))))))))
        return x + y if self.skip else y


class Net(nn.Module):
    """Two inverted residuals; ``chained``: no skips, so stem -> b1.expand, b1.project -> b2.expand
    and b2.project -> head are chains too."""

    def __init__(self, functional: bool = False, chained: bool = False) -> None:
        super().__init__()
        mid, out = (24, 32) if chained else (16, 16)
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.b1 = Block(16, 4, 3, functional, out=mid)
        self.b2 = Block(mid, 6 if not chained else 4, 5, functional, out=out)
        self.head = nn.Conv2d(out, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.head(self.b2(self.b1(x))))
        return self.fc(x.mean((2, 3)))


def _net(functional: bool = False, seed: int = 0, chained: bool = False) -> Net:
    torch.manual_seed(seed)
    m = Net(functional, chained).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return m


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _traced(m: nn.Module) -> torch.fx.GraphModule:
    """A traced copy: the rewrite mutates its modules, which ``trace`` shares with ``m``."""
    gm = trace(copy.deepcopy(m)).gm
    propagate_shapes(gm, (_images(1, 0),))
    annotate_macs(gm)
    return gm


def _hidden(gm: torch.fx.GraphModule, node_name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of node ``node_name`` when ``gm`` runs on ``x``."""
    seen: dict[str, torch.Tensor] = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            if n.name == node_name:
                seen["h"] = self.env[n.args[0]]  # type: ignore[index,assignment]
            return super().run_node(n)

    with torch.no_grad():
        Grab(gm).run(x)
    return seen["h"]


@pytest.mark.parametrize("functional", [False, True])
def test_find_chains_takes_inverted_residuals_and_nothing_shared(functional: bool) -> None:
    gm = _traced(_net(functional))
    chains = find_chains(gm)
    assert [(c.first.fqn, [d.fqn for d in c.depthwise], c.last.fqn, c.norms, c.hidden) for c in chains] == [
        ("b1.expand", ["b1.dw"], "b1.project", ["b1.bn0", "b1.bn1"], 64),
        ("b2.expand", ["b2.dw"], "b2.project", ["b2.bn0", "b2.bn1"], 96),
    ]  # stem -> relu -> b1.expand is not one: the stem's output also feeds b1's skip


def test_chains_share_a_conv_where_no_skip_joins_them() -> None:
    chains = find_chains(_traced(_net(chained=True)))
    assert [(c.first.fqn, c.last.fqn, c.hidden) for c in chains] == [
        ("stem", "b1.expand", 16), ("b1.expand", "b1.project", 64), ("b1.project", "b2.expand", 24),
        ("b2.expand", "b2.project", 96),
        ("b2.project", "head", 32)]


@pytest.mark.parametrize("functional, chained", [(False, False), (True, False), (False, True), (True, True)])
def test_full_width_in_any_order_is_exact(functional: bool, chained: bool) -> None:
    """Chained: each chain's permutation reorders a conv that the previous one already changed."""
    m = _net(functional, chained=chained)
    gm = _traced(m)
    x = _images(4, 1)
    for c in find_chains(gm):
        perm = torch.randperm(c.hidden, generator=torch.Generator().manual_seed(2)).tolist()
        w = c.last.weight.detach().reshape(c.last.geometry.out_channels, -1)[:, perm]
        b = c.last.bias.detach() if c.last.bias is not None else torch.zeros(w.shape[0])
        prune_chain(gm, c, perm, w, b)
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)


def test_duplicated_hidden_channels_are_dropped_exactly() -> None:
    """Ground truth: a block whose hidden channels come in identical pairs needs only half of them."""
    m = _net()
    blk = m.b1
    with torch.no_grad():
        half = 32
        blk.expand.weight[half:] = blk.expand.weight[:half]
        blk.dw.weight[half:] = blk.dw.weight[:half]
        for bn in (blk.bn0, blk.bn1):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[half:] = t[:half]
    gm = _traced(m)
    chain = find_chains(gm)[0]
    name = chain.last.nodes[0].name
    cal = [_images(16, s) for s in range(3)]
    hs = [_hidden(gm, name, x) for x in cal]
    mo = chain_moments(chain, [(h, h) for h in hs])
    order, resid = greedy_order(mo, ridge=1e-9)
    assert float(resid[half - 1]) < 1e-6 < float(resid[half - 2])
    keep = order[:half]
    assert sorted(k % half for k in keep) == list(range(half))  # one of each pair
    prune_chain(gm, chain, keep, *refit(mo, keep, ridge=1e-9))
    gm.recompile()
    x = _images(4, 9)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-4, atol=1e-4)


def _b2_hidden(seeds: int) -> tuple[Chain, list[torch.Tensor]]:
    """b2's chain in a traced plain net, and its project conv's inputs on ``seeds`` batches of 16."""
    gm = _traced(_net())
    chain = find_chains(gm)[1]
    return chain, [_hidden(gm, chain.last.nodes[0].name, _images(16, s)) for s in range(seeds)]


def test_greedy_curve_is_the_refit_residual_and_beats_slicing() -> None:
    """The predicted residual equals the measured one, and the data refit beats dropping columns of W."""
    chain, hs = _b2_hidden(3)
    mo = chain_moments(chain, [(h, h) for h in hs])
    order, resid = greedy_order(mo, ridge=0.0)
    k = 40
    keep = order[:k]
    w, b = refit(mo, keep, ridge=0.0)
    w_full = chain.last.weight.detach().reshape(16, -1).double()
    rows = torch.cat([h.permute(0, 2, 3, 1).reshape(-1, chain.hidden) for h in hs]).double()
    target = rows @ w_full.T
    fitted = rows[:, keep] @ w.T + b
    sliced = rows[:, keep] @ w_full[:, keep].T
    measured = float((target - fitted).pow(2).sum() / target.pow(2).sum())
    assert measured == pytest.approx(float(resid[k - 1]), rel=1e-6, abs=1e-9)
    assert measured < 0.5 * float((target - sliced).pow(2).sum() / target.pow(2).sum())
    assert bool((resid[1:] <= resid[:-1] + 1e-12).all())  # keeping more never predicts worse


def _output(gm: torch.fx.GraphModule, node_name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of node ``node_name`` when ``gm`` runs on ``x``."""
    seen: dict[str, torch.Tensor] = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            if n.name == node_name:
                seen["y"] = out  # type: ignore[assignment]
            return out

    with torch.no_grad():
        Grab(gm).run(x)
    return seen["y"]


@pytest.mark.parametrize("functional", [False, True])
def test_pruned_model_computes_the_refit(functional: bool) -> None:
    """After the rewrite, the narrowed conv's output misses the original's by the predicted residual.

    ReLU6 hidden activations have a mean, so the fitted bias matters: a rewrite that dropped
    or mixed up the bias or the column order would miss the prediction.
    """
    m = _net(functional)
    ref, gm = _traced(m), _traced(m)
    chain = find_chains(gm)[1]
    name = chain.last.nodes[0].name
    cal = [_images(16, s) for s in range(3)]
    hs = [_hidden(gm, name, x) for x in cal]
    mo = chain_moments(chain, [(h, h) for h in hs])
    keep = greedy_order(mo, ridge=0.0)[0][:30]
    w, b = refit(mo, keep, ridge=0.0)
    assert float(b.abs().max()) > 1e-3
    prune_chain(gm, chain, keep, w, b)
    gm.recompile()
    got = torch.cat([_output(gm, name, x) for x in cal]).double()
    want = torch.cat([_output(ref, name, x) for x in cal]).double()
    measured = float((got - want).pow(2).sum() / want.pow(2).sum())
    assert measured == pytest.approx(refit_residual(mo, keep, w, b), rel=1e-4)
    assert gm.get_submodule(chain.last.fqn).weight.shape[1] == 30


@pytest.mark.parametrize("functional", [False, True])
def test_skip_join_finds_the_residual_add_and_the_bn_slope(functional: bool) -> None:
    """Both blocks of the plain net end in ``x + bn2(project(h))``; the chained net has no add."""
    m = _net(functional)
    with torch.no_grad():
        m.b2.bn2.weight[3] = -0.7  # the slope keeps γ's sign
    gm = _traced(m)
    for chain, blk, skip_name in zip(find_chains(gm), (m.b1, m.b2), ("relu", "add")):
        skip, scale = skip_join(gm, chain)
        bn = blk.bn2
        want = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
        torch.testing.assert_close(scale, want)
        assert skip.name == skip_name  # relu(stem(x)) for b1, b1's output for b2
    chained = _traced(_net(functional, chained=True))
    assert all(skip_join(chained, c) is None for c in find_chains(chained))


class OffsetNet(nn.Module):
    """b1's output plus a learned per-channel offset: a broadcast add, not a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.off = nn.Parameter(torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = self.net.b1, self.net
        y = b.bn2(b.project(b.act(b.bn1(b.dw(b.act(b.bn0(b.expand(torch.relu(n.stem(x))))))))))
        return n.fc(torch.relu(n.head(y + self.off)).mean((2, 3)))


def test_a_broadcast_add_is_not_a_skip_and_compresses() -> None:
    m = OffsetNet().eval()
    gm = _traced(m)
    assert all(skip_join(gm, c) is None for c in find_chains(gm))
    x = _images(64, 3)
    out = convfx.compress(m, x[:1], method="id", flops_target=0.6, calibration=[x[:32], x[32:]], progress=False)
    with torch.no_grad():
        err = float((out(x) - m(x)).pow(2).sum() / m(x).pow(2).sum())
    assert 0 < err < 0.05


def test_a_shift_of_the_wrong_shape_is_a_clear_error() -> None:
    gm = _traced(_net())
    chain = find_chains(gm)[0]
    h = _hidden(gm, chain.last.nodes[0].name, _images(4, 1))
    with pytest.raises(ValueError, match="b1.project"):
        chain_moments(chain, [(h, h, torch.zeros(1, 16, 1, 1))])


def test_shifted_refit_is_the_least_squares_fit_of_the_shifted_target() -> None:
    """Ground truth from lstsq: a shift moves the refit's target, channel by channel."""
    chain, hs = _b2_hidden(2)
    gen = torch.Generator().manual_seed(5)
    shifts = [torch.randn(h.shape[0], 16, *h.shape[2:], generator=gen) for h in hs]
    mo = chain_moments(chain, [(h, h, d) for h, d in zip(hs, shifts)])
    keep = greedy_order(mo, ridge=0.0)[0][:20]
    w, b = refit(mo, keep, ridge=0.0)
    rows = torch.cat([h.permute(0, 2, 3, 1).reshape(-1, chain.hidden) for h in hs]).double()
    target = rows @ chain.last.weight.detach().reshape(16, -1).double().T
    target = target + torch.cat([d.permute(0, 2, 3, 1).reshape(-1, 16) for d in shifts]).double()
    a = torch.cat([rows[:, keep], rows.new_ones(rows.shape[0], 1)], 1)
    sol = torch.linalg.lstsq(a, target).solution.T
    torch.testing.assert_close(w, sol[:, :-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b, sol[:, -1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("functional", "steps"), [(False, 0), (True, 0), (False, 30)])
def test_skip_targets_lower_the_block_output_error(functional: bool, steps: int) -> None:
    """With b1 narrowed, b2's input is off; b2's refit cancelling that error on its skip leaves
    b2's block output closer to the original's (on the calibration images) than a refit of b2's
    own conv output alone. b1's skip input (the stem) is exact, so b1 is fitted the same way.
    With ``refine_steps`` the chain is trained towards the same shifted target."""
    m = _net(functional)
    x = _images(64, 3)
    outs = {}
    for flag in (False, True):
        options = convfx.CompressOptions(method="id", flops_target=0.3, calibration=[x[:32], x[32:]], progress=False,
                                         refine_steps=steps, skip_targets=flag)
        gm = convfx.api.compress_with(m, x[:1], options)
        outs[flag] = _output(gm, _head_input(gm), x)
    want = _output(_traced(m), _head_input(_traced(m)), x)
    err = {f: float((o - want).pow(2).sum() / want.pow(2).sum()) for f, o in outs.items()}
    assert err[True] < err[False]


def _head_input(gm: torch.fx.GraphModule) -> str:
    return next(n for n in gm.graph.nodes if n.target == "head").args[0].name


@pytest.mark.parametrize("functional", [False, True])
def test_chain_graph_is_the_chain_and_refine_recovers_a_reachable_target(functional: bool) -> None:
    """chain_graph computes the last conv's output from the chain's input; refine_chain, started
    from a perturbed narrowed chain whose exact solution exists (duplicated channels), gets back
    to it, training ``gm``'s own weights."""
    m = _net(functional)
    blk = m.b1
    with torch.no_grad():
        blk.expand.weight[32:] = blk.expand.weight[:32]
        blk.dw.weight[32:] = blk.dw.weight[:32]
        for bn in (blk.bn0, blk.bn1):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[32:] = t[:32]
    gm = _traced(m)
    chain = find_chains(gm)[0]
    first, last = chain.first.nodes[0], chain.last.nodes[0]
    xs = torch.cat([_images(16, s) for s in range(2)])
    x_in = _hidden(gm, first.name, xs)
    target = _output(gm, last.name, xs)
    torch.testing.assert_close(chain_graph(gm, chain)(x_in), target)
    w = chain.last.weight.detach().reshape(16, 64)
    keep = list(range(32))
    prune_chain(gm, chain, keep, w[:, :32] + w[:, 32:] + 0.3 * torch.randn(16, 32), torch.zeros(16))
    gm.recompile()
    sub = chain_graph(gm, chain)
    with torch.no_grad():
        before = float((sub(x_in) - target).pow(2).sum() / target.pow(2).sum())
    after = refine_chain(sub, x_in, target, steps=300, lr=1e-2)
    assert after < before / 20
    with torch.no_grad():
        y = _output(gm, last.name, xs)
    assert float((y - target).pow(2).sum() / target.pow(2).sum()) == pytest.approx(after, rel=1e-3)
    assert not any(p.grad is not None for p in gm.parameters())


@pytest.mark.parametrize("chained", [False, True])
def test_refine_steps_lower_the_output_error_and_are_deterministic(chained: bool) -> None:
    """Each chain's own (local) output error drops; the widths stay those of the allocation."""
    m = _net(functional=chained, chained=chained)
    cal = [_images(16, s) for s in range(3)]

    def run(steps: int) -> torch.fx.GraphModule:
        return convfx.compress(m, _images(1, 0), method="id", flops_target=0.45, calibration=cal, refine_steps=steps,
                               progress=False)

    plain, refined, again = run(0), run(100), run(100)
    err = {id(g): {r.fqn: r.output_error for r in g.convfx_report.layers if r.output_error} for g in (plain, refined)}
    assert err[id(plain)].keys() == err[id(refined)].keys() and err[id(plain)]
    assert all(err[id(refined)][k] <= err[id(plain)][k] * (1 + 1e-6) for k in err[id(plain)])  # never worse
    assert sum(err[id(refined)].values()) < 0.99 * sum(err[id(plain)].values())
    assert [r.ranks for r in plain.convfx_report.layers] == [r.ranks for r in refined.convfx_report.layers]
    assert "refined by 100 local gradient steps" in refined.convfx_report.notes[-1]
    sa, sb = refined.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shared_conv_chains_compress_save_and_load(tmp_path) -> None:
    """Both chains around b1.project narrowed: it loses rows and columns, reported once with both widths."""
    m = _net(chained=True)
    cal = [_images(16, s) for s in range(3)]
    gm = convfx.compress(m, _images(1, 0), method="id", flops_target=0.4, calibration=cal, progress=False)
    rep = gm.convfx_report
    assert 0.99 * 0.4 * rep.conv_macs_before <= rep.conv_macs_after <= 0.4 * rep.conv_macs_before
    assert rep.conv_macs_after == sum(r.macs_after for r in rep.layers)
    assert len({r.fqn for r in rep.layers}) == len(rep.layers)
    row = next(r for r in rep.layers if r.fqn == "b1.project")
    k1, k2 = gm.b1.dw.weight.shape[0], gm.b2.expand.weight.shape[1]
    assert k2 < 24, "the allocation should narrow the 24-channel chain too for this test to mean something"
    assert gm.b1.project.weight.shape[:2] == (k2, k1)
    assert row.ranks == tuple(k for k, full in ((k1, 64), (k2, 24)) if k < full)
    assert row.macs_after == 16 * 16 * k1 * k2
    back = convfx.load(convfx.save(gm, tmp_path / "id.convfx"), model=_net(chained=True, seed=3))
    x = _images(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(back(x), gm(x))
        y0, y1 = m(x), gm(x)
    assert float((y1 - y0).norm() / y0.norm()) < 0.5


@pytest.mark.parametrize("target", [0.8, 0.6])
@pytest.mark.parametrize("functional", [False, True])
def test_flops_target_lands_and_macs_follow_the_widths(target: float, functional: bool) -> None:
    m = _net(functional)
    cal = [_images(16, s) for s in range(3)]
    gm = convfx.compress(m, _images(1, 0), method="id", flops_target=target, calibration=cal, progress=False)
    rep = gm.convfx_report
    assert rep.conv_macs_after <= target * rep.conv_macs_before
    assert rep.conv_macs_after >= 0.99 * target * rep.conv_macs_before
    # analytic MACs of a narrowed block at hidden width k on a 16x16 map (stem stride 2)
    for blk, c, e, ks in (("b1", 16, 4, 3), ("b2", 16, 6, 5)):
        rows = {r.fqn.rsplit(".", 1)[1]: r for r in rep.layers if r.fqn.startswith(blk + ".")}
        k = rows["project"].ranks[0] if rows["project"].ranks else c * e
        hw = 16 * 16
        assert sum(r.macs_after for r in rows.values()) == hw * k * (c + ks * ks + c)
        assert getattr(gm, blk).dw.weight.shape[0] == k
    assert rep.conv_macs_after == sum(r.macs_after for r in rep.layers)
    assert {r.fqn for r in rep.layers if r.skipped} == {"stem", "head"}
    with torch.no_grad():
        y0, y1 = m(_images(8, 7)), gm(_images(8, 7))
    assert float((y1 - y0).norm() / y0.norm()) < 0.2


def test_dataloader_and_generator_give_the_same_widths_and_weights() -> None:
    m = _net()
    xs = torch.cat([_images(16, s) for s in range(3)])
    a = convfx.compress(m, xs[:1], method="id", flops_target=0.7,
                        calibration=DataLoader(TensorDataset(xs, torch.zeros(48)), batch_size=16), progress=False)
    b = convfx.compress(m, xs[:1], method="id", flops_target=0.7,
                        calibration=(xs[i:i + 16] for i in range(0, 48, 16)), progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key])


@pytest.mark.parametrize("kwargs, match", [
    ({"flops_target": 0.7, "calibration": "cal", "refine_steps": -1}, "refine_steps"),
    ({"flops_target": 0.7, "calibration": "cal", "refine_steps": 2.5}, "refine_steps"),
    ({"flops_target": None, "calibration": "cal"}, "flops_target"),
    ({"flops_target": 0.7, "calibration": None}, "calibration"),
    ({"flops_target": 0.7, "calibration": "cal", "rank_multiple": 8}, "rank_multiple"),
])
def test_id_argument_errors_name_the_argument(kwargs: dict, match: str) -> None:
    cal = [_images(4, 0)]
    kw = {k: (cal if v == "cal" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        convfx.compress(_net(), _images(1, 0), method="id", progress=False, **kw)


def test_id_without_chains_or_out_of_reach_is_a_clear_error() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with pytest.raises(ConvfxError, match="no conv -> channel-wise ops -> 1x1 conv chain"):
        convfx.compress(plain, _images(1, 0), method="id", flops_target=0.5, calibration=[_images(4, 0)],
                        progress=False)
    with pytest.raises(ConvfxError, match=r"\[flops_target\].*out of reach"):
        convfx.compress(_net(), _images(1, 0), method="id", flops_target=0.05, calibration=[_images(4, 0)],
                        progress=False)


def test_saved_id_model_loads_with_the_same_outputs(tmp_path) -> None:
    m = _net(functional=True)
    gm = convfx.compress(m, _images(1, 0), method="id", flops_target=0.7, calibration=[_images(16, 1)],
                         progress=False)
    path = convfx.save(gm, tmp_path / "id.convfx")
    back = convfx.load(path, model=_net(functional=True, seed=5))
    x = _images(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(back(x), gm(x))
    assert back.convfx_report.conv_macs_after == gm.convfx_report.conv_macs_after


def test_refine_steps_belong_to_method_id() -> None:
    with pytest.raises(ValueError, match=r"refine_steps: only method='id'.*tucker"):
        convfx.compress(_net(), _images(1, 0), method="tucker", rank=0.5, refine_steps=10, progress=False)
