"""Evaluation, fine-tuning, distillation, BN re-estimation and exact in-process resume."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

from convfx.checkpoint import load_checkpoint
from convfx.train import (
    CHECKPOINT_NAME,
    DeterministicBatchSampler,
    StepInfo,
    default_feature_layers,
    distillation_loss,
    evaluate,
    feature_distillation_loss,
    finetune,
    param_groups,
    recalibrate_bn,
)
import convfx_tests_toy as toy  # registered by conftest.py
from passes.errors import ConvfxError




# Bit-exact comparisons need a fixed intra-op thread count (and the box is shared).
pytestmark = pytest.mark.usefixtures("one_thread")


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------- evaluate


class _TableModel(nn.Module):
    """Returns a fixed row of logits for each input index (inputs are indices)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)
        self.scale = nn.Parameter(torch.ones(()))
        self.inner = nn.Dropout(0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx.long()] * self.scale


@pytest.mark.parametrize("num_classes", [3, 5, 10])
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_evaluate_matches_hand_count(num_classes: int, batch_size: int) -> None:
    g = torch.Generator().manual_seed(num_classes * 100 + batch_size)
    n = 50
    targets = torch.randint(0, num_classes, (n,), generator=g)
    ranks = torch.randint(0, num_classes, (n,), generator=g)  # where the target lands in the ordering
    logits = torch.empty(n, num_classes)
    for i in range(n):
        values = torch.linspace(3.0, -3.0, num_classes)  # distinct, descending: no ties
        others = [c for c in range(num_classes) if c != targets[i]]
        order = others[: ranks[i]] + [int(targets[i])] + others[ranks[i]:]
        logits[i, order] = values
    k = min(5, num_classes)
    expect_top1 = 100.0 * float((ranks == 0).sum()) / n
    expect_top5 = 100.0 * float((ranks < k).sum()) / n
    expect_loss = sum(
        math.log(sum(math.exp(v) for v in logits[i].tolist())) - float(logits[i, targets[i]]) for i in range(n)
    ) / n

    model = _TableModel(logits)
    model.train()
    model.inner.eval()  # a mixed mode must survive evaluate()
    loader = DataLoader(TensorDataset(torch.arange(n), targets), batch_size=batch_size)
    res = evaluate(model, loader, progress=False)
    assert res["n"] == n
    assert res["top1"] == pytest.approx(expect_top1)
    assert res["top5"] == pytest.approx(expect_top5)
    assert res["loss"] == pytest.approx(expect_loss, rel=1e-5)
    assert model.training and not model.inner.training

    limited = evaluate(model, loader, progress=False, max_batches=1)
    assert limited["n"] == min(batch_size, n)


def test_evaluate_rejects_bad_output_and_empty_loader() -> None:
    bad = nn.Flatten(0)  # 1-D output
    loader = DataLoader(TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(ConvfxError, match="logits"):
        evaluate(bad, loader, progress=False)
    empty = DataLoader(TensorDataset(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)), batch_size=2)
    with pytest.raises(ConvfxError, match="no samples"):
        evaluate(nn.Linear(3, 2), empty, progress=False)


# ---------------------------------------------------------------- losses, groups, BN


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_distillation_loss_formula(alpha: float, temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    p_t = [[math.exp(v / temperature) for v in row] for row in t.tolist()]
    p_t = [[v / sum(row) for v in row] for row in p_t]
    p_s = [[math.exp(v / temperature) for v in row] for row in s.tolist()]
    p_s = [[v / sum(row) for v in row] for row in p_s]
    kl = sum(pt * math.log(pt / ps) for rt, rs in zip(p_t, p_s) for pt, ps in zip(rt, rs)) / 6
    ce = sum(-math.log(math.exp(row[c]) / sum(math.exp(v) for v in row)) for row, c in zip(s.tolist(), y.tolist())) / 6
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    got = distillation_loss(s, t, y, alpha=alpha, temperature=temperature)
    assert float(got) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_param_groups_skip_bn_and_biases(weight_decay: float, tmp_path: Path) -> None:
    model = toy.make_model()
    model.features[0].weight.requires_grad_(False)  # frozen: in no group
    groups = param_groups(model, weight_decay)
    named = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(named[id(p)] for p in groups[0]["params"])
    no_decay = sorted(named[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == weight_decay and groups[1]["weight_decay"] == 0.0
    assert decay == ["fc.weight", "features.3.weight"]
    assert no_decay == sorted(["fc.bias", "features.1.weight", "features.1.bias", "features.4.weight", "features.4.bias"])

    # finetune's optimizer uses exactly these groups (visible in its checkpoint)
    train, _ = toy.make_loaders(n_train=32)
    finetune(model, train, epochs=1, lr=0.01, weight_decay=weight_decay, checkpoint_dir=tmp_path,
             progress=False, max_steps_per_epoch=1)
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)["optimizer"]["param_groups"]
    assert [(len(g["params"]), g["weight_decay"]) for g in saved] == [(2, weight_decay), (5, 0.0)]


class _ConvDropBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)  # must stay off while statistics are gathered
        self.bn = nn.BatchNorm2d(4, momentum=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.drop(self.conv(x)))


@pytest.mark.parametrize("num_batches", [1, 3])
@pytest.mark.parametrize("was_training", [False, True])
def test_recalibrate_bn_reproduces_batch_statistics(num_batches: int, was_training: bool) -> None:
    torch.manual_seed(0)
    model = _ConvDropBN()
    model.bn.running_mean.fill_(5.0)  # stale statistics to be replaced
    model.train(was_training)
    x = torch.randn(4 * 5, 3, 8, 8) * 2 + 1
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=5)
    recalibrate_bn(model, loader, num_batches)

    with torch.no_grad():
        feats = [model.conv(xb) for xb in x.split(5)[:num_batches]]
    # equal batch sizes: the cumulative average of batch means is the overall mean, and
    # the running variance is the average of the per-batch unbiased variances
    mean = torch.cat(feats).mean(dim=(0, 2, 3))
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, var, rtol=1e-5, atol=1e-5)
    assert int(model.bn.num_batches_tracked) == num_batches
    assert model.bn.momentum == 0.3
    assert all(m.training == was_training for m in model.modules())


def test_recalibrate_bn_empty_loader_keeps_old_statistics() -> None:
    model = _ConvDropBN()
    model.bn.running_mean.fill_(2.0)
    empty = DataLoader(TensorDataset(torch.randn(0, 3, 8, 8)), batch_size=2)
    with pytest.raises(ConvfxError, match="no batches"):
        recalibrate_bn(model, empty, 2)
    assert torch.all(model.bn.running_mean == 2.0) and model.bn.momentum == 0.3


# --------------------------------------------------------------------- sampling


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n", [29, 32])
def test_sampler_shards_cover_the_epoch(world_size: int, drop_last: bool, n: int) -> None:
    kw = dict(seed=3, epoch=1, drop_last=drop_last, world_size=world_size)
    per_rank = [list(DeterministicBatchSampler(n, 4, rank=r, **kw)) for r in range(world_size)]
    steps = DeterministicBatchSampler.steps_per_epoch(n, 4, world_size, drop_last)
    assert all(len(b) == steps for b in per_rank)
    for s in range(steps):  # equal per-rank sizes at every step (DDP would hang otherwise)
        assert len({len(b[s]) for b in per_rank}) == 1
    seen = sorted(i for b in per_rank for batch in b for i in batch)
    if drop_last:
        assert len(seen) == len(set(seen)) == (n // (4 * world_size)) * 4 * world_size
    else:
        assert set(seen) == set(range(n)) and len(seen) == -(-n // world_size) * world_size
    # restartable: starting at step k yields exactly the tail
    tail = list(DeterministicBatchSampler(n, 4, rank=0, start_step=2, **kw))
    assert tail == per_rank[0][2:]
    # the order depends on the epoch, not on anything else
    assert list(DeterministicBatchSampler(n, 4, rank=0, **kw)) == per_rank[0]
    assert list(DeterministicBatchSampler(n, 4, rank=0, **{**kw, "epoch": 2})) != per_rank[0]


# -------------------------------------------------------------------- finetune


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_finetune_reduces_loss(schedule: str) -> None:
    train, val = toy.make_loaders()
    model = toy.make_model()
    before = evaluate(model, train, progress=False)["loss"]
    out = finetune(model, train, val, epochs=3, lr=0.05, schedule=schedule, warmup_steps=2,
                   progress=False, checkpoint_dir=None)
    after = evaluate(model, train, progress=False)["loss"]
    assert after < before
    hist = out["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and out["step"] == 36
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert {"train_loss", "val_top1", "val_top5", "val_loss", "images_per_s", "lr", "step"} <= hist[0].keys()
    assert model.training


def test_finetune_restores_module_modes() -> None:
    train, _ = toy.make_loaders(n_train=32)
    student, teacher = toy.make_model(), toy.make_model(seed=1)
    student.eval()
    student.features[1].train()  # a mixed mode, as a user may have set it
    teacher.train()
    finetune(student, train, epochs=1, lr=0.01, teacher=teacher, progress=False)
    assert not student.training and student.features[1].training and not student.fc.training
    assert all(m.training for m in teacher.modules())


# ------------------------------------------------------------------- divergence


def _compressed_toy() -> fx.GraphModule:
    import convfx

    return convfx.compress(toy.make_model(), torch.randn(1, 3, 16, 16), rank=0.5)


def _finite(model: nn.Module) -> bool:
    return all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("bn_recalibrate", [0, 2])
def test_diverging_finetune_gives_the_caller_back_its_model(bn_recalibrate: int) -> None:
    """The issue's reproducer: lr=1e6 on a compressed model, no checkpoint_dir."""
    g = _compressed_toy()
    g.eval()
    before = copy.deepcopy(g.state_dict())
    train, _ = toy.make_loaders(n_train=64)
    with pytest.raises(ConvfxError, match=r"diverged at epoch 1, step \d+ \(global step \d+\)") as info:
        finetune(g, train, None, epochs=1, lr=1e6, bn_recalibrate=bn_recalibrate, progress=False)
    err = info.value
    assert err.where == "finetune"
    assert "in-memory copy taken before fine-tuning started" in err.reason
    assert "lr=1e+06" in (err.hint or "")
    assert "checkpoint" not in str(err)  # none was asked for, so none is promised
    assert _equal_states(g.state_dict(), before)  # weights and BN statistics, bit for bit
    assert _finite(g) and not g.training


class _InfiniteGradient(nn.Module):
    """Adds sqrt(s) at s = 0 to the logits: the loss stays finite, the gradient of s is infinite."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = toy.make_model()
        self.s = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + torch.sqrt(self.s)


def test_a_last_step_that_breaks_the_weights_is_caught_although_its_loss_was_finite() -> None:
    """One step whose loss is finite and whose update is not: no later loss could reveal it."""
    train, _ = toy.make_loaders(n_train=32)
    model = _InfiniteGradient()
    before = copy.deepcopy(model.state_dict())
    seen: list[StepInfo] = []
    with pytest.raises(ConvfxError) as info:
        finetune(model, train, epochs=1, lr=0.01, max_steps_per_epoch=1, progress=False, callback=seen.append)
    assert info.value.reason.startswith(
        "training diverged at epoch 1, step 1 (global step 1): the loss was finite but the step left "
        "parameters or buffers NaN or infinite; the model's weights and buffers were restored from the "
        "in-memory copy taken before fine-tuning started")
    assert seen == []  # the callback never saw the broken step
    assert _equal_states(model.state_dict(), before) and _finite(model)


def _poisoned_run(ckpt: Path | None, at_step: int, every: int = 2) -> tuple[nn.Module, pytest.ExceptionInfo,
                                                                               dict[int, dict]]:
    """2 epochs of 6 steps; the callback puts a NaN into a weight after ``at_step``."""
    train, val = toy.make_loaders(n_train=96)
    model = toy.make_model()
    states: dict[int, dict] = {}

    def poison(info: StepInfo) -> None:
        states[info.global_step] = copy.deepcopy(model.state_dict())
        if info.global_step == at_step:
            with torch.no_grad():
                model.features[0].weight[0, 0, 0, 0] = float("nan")

    with pytest.raises(ConvfxError) as info:
        finetune(model, train, val, epochs=2, lr=0.05, checkpoint_dir=ckpt, checkpoint_every=every,
                 progress=False, callback=poison)
    return model, info, states


def test_divergence_restores_the_start_of_the_failed_epoch() -> None:
    model, info, states = _poisoned_run(None, at_step=9)
    assert "epoch 2, step 4 (global step 10): the loss was NaN or infinite" in info.value.reason
    assert "in-memory copy taken at the start of epoch 2 (global step 6)" in info.value.reason
    assert _equal_states(model.state_dict(), states[6])  # what epoch 1 ended with


def test_divergence_restores_a_newer_checkpoint(tmp_path: Path) -> None:
    model, info, _ = _poisoned_run(tmp_path, at_step=9)
    path = tmp_path / CHECKPOINT_NAME
    assert f"restored from the checkpoint {path} (global step 8)" in info.value.reason
    saved = load_checkpoint(path)
    assert saved["global_step"] == 8  # the diverged step 10 was never saved
    assert _equal_states(model.state_dict(), saved["model"])


def test_divergence_without_a_newer_checkpoint_uses_the_epoch_start(tmp_path: Path) -> None:
    # checkpoints only at epoch ends: the epoch-1 checkpoint is as old as the epoch-2 copy
    model, info, states = _poisoned_run(tmp_path, at_step=7, every=0)
    assert "epoch 2, step 2 (global step 8)" in info.value.reason
    assert "in-memory copy taken at the start of epoch 2" in info.value.reason
    assert _equal_states(model.state_dict(), states[6])
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 6


def test_divergence_guard_names_the_first_bad_step_when_read_late() -> None:
    """On an accelerator the guard is read every N steps; the step it names is still the first bad one."""
    from convfx.training.guard import Divergence, DivergenceGuard

    model = nn.Linear(2, 2)
    guard = DivergenceGuard(model, torch.device("cpu"), global_step=10, poll_every=4, distributed=False)
    losses = [1.0, float("nan"), 2.0, float("inf")]
    for k, loss in enumerate(losses, start=11):
        guard.observe(torch.tensor(loss))
        assert guard.due(k) == (k == 12)
    assert guard.poll() == Divergence(global_step=12, loss=True)

    guard = DivergenceGuard(model, torch.device("cpu"), global_step=0, poll_every=1, distributed=False)
    guard.observe(torch.tensor(1.0))
    assert guard.poll() is None
    with torch.no_grad():
        model.bias[1] = float("-inf")
    guard.observe(torch.tensor(1.0))
    assert guard.poll() == Divergence(global_step=2, loss=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_weight_check_sees_every_non_finite_value_and_no_overflow(dtype: torch.dtype) -> None:
    from convfx.training.guard import _all_finite

    for bad in (float("nan"), float("inf"), float("-inf")):
        tensors = [torch.randn(50, dtype=dtype) for _ in range(3)]
        tensors[1][7] = bad
        assert not bool(_all_finite(tensors, on_cpu=True)), bad
    big = torch.finfo(dtype).max / 2  # each finite, their sum far beyond the dtype's range
    assert bool(_all_finite([torch.full((4096,), big, dtype=dtype), -torch.full((9,), big, dtype=dtype)],
                            on_cpu=True))


def test_buffers_that_are_non_finite_by_design_are_not_divergence() -> None:
    """A -inf mask buffer (as attention masks are) does not stop fine-tuning."""
    model = toy.make_model()
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    train, _ = toy.make_loaders(n_train=32)
    out = finetune(model, train, epochs=1, lr=0.01, progress=False)
    assert out["step"] == 2 and torch.equal(model.mask, torch.tensor([0.0, float("-inf")]))


@pytest.mark.parametrize("name,value", [("lr", float("inf")), ("lr", float("nan")), ("lr", -0.1),
                                        ("momentum", float("inf")), ("weight_decay", float("nan")),
                                        ("kd_temperature", float("inf"))])
def test_finetune_rejects_non_finite_numbers(name: str, value: float) -> None:
    train, _ = toy.make_loaders(n_train=32)
    model = toy.make_model()
    before = copy.deepcopy(model.state_dict())
    args = dict(epochs=1, lr=0.1, progress=False)
    args[name] = value
    with pytest.raises(ConvfxError, match=rf"{name} must be a finite number") as info:
        finetune(model, train, **args)
    assert info.value.where == "finetune"
    assert _equal_states(model.state_dict(), before)


def test_distillation_first_step_matches_formula() -> None:
    train, _ = toy.make_loaders(n_train=64)
    student = toy.make_model(seed=0)
    teacher = toy.make_model(seed=7)
    teacher.train()
    student0, teacher0 = copy.deepcopy(student), copy.deepcopy(teacher)
    seen: list[StepInfo] = []
    finetune(student, train, epochs=1, lr=0.01, teacher=teacher, kd_alpha=0.7, kd_temperature=3.0,
             progress=False, callback=seen.append, max_steps_per_epoch=2)

    first = next(iter(DeterministicBatchSampler(64, 16, seed=0, epoch=0)))
    x, y = train.dataset[first]
    student0.train()
    teacher0.eval()
    with torch.no_grad():
        expected = distillation_loss(student0(x), teacher0(x), y, alpha=0.7, temperature=3.0)
    assert float(seen[0].loss) == pytest.approx(float(expected), rel=1e-5)
    assert teacher.training  # mode restored
    assert _equal_states(teacher.state_dict(), teacher0.state_dict())  # never updated, no BN drift


def test_distillation_with_alpha_zero_is_plain_training() -> None:
    train, _ = toy.make_loaders(n_train=64)
    plain, distilled = toy.make_model(), toy.make_model()
    finetune(plain, train, epochs=1, lr=0.05, progress=False)
    finetune(distilled, train, epochs=1, lr=0.05, teacher=toy.make_model(seed=3), kd_alpha=0.0, progress=False)
    assert _equal_states(plain.state_dict(), distilled.state_dict())


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_feature_distillation_loss_formula(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 8, 3, 3, generator=g)]
    s = [scale * t[0], t[1] + 1.0]
    expected = ((scale - 1.0) ** 2 + float(t[1].numel() / t[1].pow(2).sum())) / 2
    assert float(feature_distillation_loss(s, t)) == pytest.approx(expected, rel=1e-5)
    assert float(feature_distillation_loss(t, t)) == 0.0


def _bn_error(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    """Mean relative error of every shared BN output (both models in eval mode)."""
    outs: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
    handles = [m.register_forward_hook(lambda _m, _i, o, k=k: outs[k].append(o))
               for k, model in (("s", student), ("t", teacher)) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d)]
    student.eval()
    teacher.eval()
    with torch.no_grad():
        student(x)
        teacher(x)
    for h in handles:
        h.remove()
    return float(feature_distillation_loss(outs["s"], outs["t"]))


@pytest.mark.parametrize("fx_student", [False, True])
def test_feature_distillation_pulls_activations_to_the_teacher(fx_student: bool) -> None:
    train, _ = toy.make_loaders(n_train=128)
    teacher = toy.make_model(seed=5)
    student: nn.Module = toy.make_model(seed=6)
    if fx_student:
        student = fx.symbolic_trace(student)
    x = train.dataset[:64][0]
    names = default_feature_layers(student, teacher)
    assert names == [n for n, m in teacher.named_modules() if isinstance(m, nn.BatchNorm2d)] and names
    plain, pulled = copy.deepcopy(student), copy.deepcopy(student)
    before = _bn_error(student, teacher, x)
    common = dict(epochs=4, lr=0.05, teacher=teacher, kd_alpha=0.0, progress=False)
    finetune(plain, train, **common)
    out = finetune(pulled, train, feature_kd=5.0, **common)
    assert _bn_error(pulled, teacher, x) < 0.5 * min(before, _bn_error(plain, teacher, x))
    assert out["history"][-1]["train_loss"] > 0
    for model in (pulled, teacher):  # the hooks are gone afterwards
        assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "bad",
    [{"feature_kd": -1.0}, {"feature_kd": float("nan")}, {"feature_kd": 1.0, "teacher": None},
     {"feature_kd": 1.0, "feature_layers": ["features.99"]}, {"feature_kd": 1.0, "feature_layers": []},
     {"feature_kd": 1.0, "feature_layers": ["features.1", "fc.weight"]}],
)
def test_feature_distillation_rejects_bad_arguments(bad: dict) -> None:
    train, _ = toy.make_loaders(n_train=32)
    args: dict = dict(epochs=1, lr=0.1, progress=False, teacher=toy.make_model(seed=1))
    args.update(bad)
    student = toy.make_model()
    with pytest.raises(ConvfxError) as err:
        finetune(student, train, **args)
    assert all(not m._forward_hooks for m in student.modules())  # nothing left behind
    if bad.get("feature_layers"):
        assert repr(bad["feature_layers"][-1]) in str(err.value)


class _Interrupt(Exception):
    pass


def _run(ckpt: Path | None, *, stop_at: int | None = None, graceful: bool = False, fx_model: bool = False,
         teacher_seed: int | None = None, **kw) -> tuple[dict[str, torch.Tensor], dict]:
    train, val = toy.make_loaders(n_train=96, augment=True)
    model: nn.Module = toy.make_model(dropout=0.2)
    if fx_model:
        model = fx.symbolic_trace(model)
    teacher = toy.make_model(seed=teacher_seed) if teacher_seed is not None else None

    def callback(info: StepInfo) -> bool | None:
        if info.global_step == stop_at:
            if graceful:
                return True
            raise _Interrupt
        return None

    args = dict(epochs=2, lr=0.05, warmup_steps=2, bn_recalibrate=2, checkpoint_every=2, progress=False)
    args.update(kw)
    out = finetune(model, train, val, checkpoint_dir=ckpt, callback=callback, teacher=teacher, **args)
    return model.state_dict(), out


VARIANTS = {
    "cosine": {},
    "onecycle+teacher": {"schedule": "onecycle", "teacher_seed": 9},
    "fx-graphmodule": {"fx_model": True},
    "fx+feature-kd": {"fx_model": True, "teacher_seed": 4, "feature_kd": 2.0},
}
_REFERENCES: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}


def _reference(variant: str) -> tuple[dict[str, torch.Tensor], dict]:
    if variant not in _REFERENCES:
        _REFERENCES[variant] = _run(None, **VARIANTS[variant])
    return _REFERENCES[variant]


# 96 samples / batch 16 = 6 steps per epoch, 12 in all.  ``saved``: the global step of
# the checkpoint the interrupted run leaves (the last step of an epoch is only saved by
# the epoch-end checkpoint, after validation, which an interrupt at that step pre-empts).
@pytest.mark.parametrize(
    "stop_at,every,graceful,saved",
    [(1, 2, False, None), (3, 2, False, 2), (6, 1, False, 5), (7, 3, False, 6), (11, 2, True, 11),
     (6, 4, True, 6)],
    ids=["before-first-checkpoint", "mid-epoch", "epoch-end", "between-checkpoints", "graceful-stop",
         "graceful-stop-at-epoch-end"],
)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interrupt_and_resume_is_bit_exact(tmp_path: Path, stop_at: int, every: int, graceful: bool,
                                           saved: int | None, variant: str) -> None:
    kw = VARIANTS[variant]
    ref_state, ref_out = _reference(variant)
    if graceful:
        _, out = _run(tmp_path, stop_at=stop_at, graceful=True, checkpoint_every=every, **kw)
        assert out["stopped_early"] and out["step"] == stop_at
        assert len(out["history"]) == stop_at // 6
    else:
        with pytest.raises(_Interrupt):
            _run(tmp_path, stop_at=stop_at, checkpoint_every=every, **kw)
    path = tmp_path / CHECKPOINT_NAME
    saved_step = load_checkpoint(path)["global_step"] if path.exists() else None
    assert saved_step == saved
    state, out = _run(tmp_path, checkpoint_every=every, **kw)
    assert out["resumed_from"] == saved_step
    assert _equal_states(state, ref_state)
    assert [h["train_loss"] for h in out["history"]] == [h["train_loss"] for h in ref_out["history"]]
    assert [h["val_top1"] for h in out["history"]] == [h["val_top1"] for h in ref_out["history"]]


def test_resume_of_a_finished_run_is_a_no_op(tmp_path: Path) -> None:
    state, out = _run(tmp_path)
    again, out2 = _run(tmp_path)
    assert _equal_states(state, again)
    assert out2["resumed_from"] == out["step"] == out2["step"]
    assert out2["history"] == out["history"]


@pytest.mark.parametrize("change", [{"lr": 0.1}, {"epochs": 3}, {"seed": 1}])
def test_resume_with_other_config_is_refused(tmp_path: Path, change: dict) -> None:
    _run(tmp_path, max_steps_per_epoch=2)
    with pytest.raises(ConvfxError, match=f"different configuration.*{next(iter(change))}"):
        _run(tmp_path, max_steps_per_epoch=2, **change)
    # resume=False starts over instead
    _, out = _run(tmp_path, max_steps_per_epoch=2, resume=False, **change)
    assert out["resumed_from"] is None


@pytest.mark.parametrize(
    "bad",
    [{"epochs": 0}, {"lr": 0.0}, {"schedule": "step"}, {"kd_alpha": 1.5}, {"kd_temperature": 0.0},
     {"checkpoint_every": -1}, {"max_steps_per_epoch": 0}, {"warmup_steps": 100, "schedule": "onecycle"},
     {"nesterov": True, "momentum": 0.0}, {"weight_decay": -1.0}],
)
def test_finetune_rejects_bad_arguments(bad: dict) -> None:
    train, _ = toy.make_loaders(n_train=32)
    args = dict(epochs=1, lr=0.1, progress=False)
    args.update(bad)
    with pytest.raises(ConvfxError):
        finetune(toy.make_model(), train, **args)


@pytest.mark.parametrize(
    "loader",
    [
        DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)),
                   batch_size=4, sampler=torch.utils.data.WeightedRandomSampler([1.0] * 8, 8)),
        DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)), batch_size=None),
        DataLoader(TensorDataset(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)),
                   batch_size=4, drop_last=True),
    ],
    ids=["weighted-sampler", "no-batch-size", "no-steps"],
)
def test_finetune_rejects_unreproducible_loaders(loader: DataLoader) -> None:
    with pytest.raises(ConvfxError):
        finetune(toy.make_model(), loader, epochs=1, lr=0.1, progress=False)


@pytest.mark.slow
def test_resume_is_independent_of_loader_workers(tmp_path: Path) -> None:
    """Augmentation is seeded per sample, so worker count and restart point do not matter."""
    def run(ckpt: Path | None, workers: int, stop_at: int | None = None) -> dict[str, torch.Tensor]:
        train, _ = toy.make_loaders(n_train=96, augment=True, num_workers=workers)
        model = toy.make_model(dropout=0.2)

        def callback(info: StepInfo) -> None:
            if info.global_step == stop_at:
                raise _Interrupt

        finetune(model, train, epochs=2, lr=0.05, checkpoint_dir=ckpt, checkpoint_every=2,
                 progress=False, callback=callback)
        return model.state_dict()

    ref = run(None, workers=2)
    with pytest.raises(_Interrupt):
        run(tmp_path, workers=2, stop_at=7)
    assert _equal_states(run(tmp_path, workers=0), ref)
