"""Recovery stage: label-free distillation of the compressed net from the original (passes.recover)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import convfx

from passes.calibrate import output_discrepancy
from passes.convs import find_sites
from passes.errors import ConvfxError
from passes.factors import FactorPlan, Factorized, decompose_weights
from passes.recover import (BN_MODES, TRAIN_SETS, DistillConfig, DistillResult, default_augment, distill, inputs_only,
                            mix, penultimate)
from passes.rewrite import factorize_sites
from passes.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(nn.Module):
    """A small conv net with BN and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        )
        self.head = nn.Linear(24 * 4, 10)

    def features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 2).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _batches(n: int, seed: int, size: int = 32) -> list[Tensor]:
    """Smooth random images plus noise: all from one distribution, different per seed."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(12, 12), mode="bilinear", align_corners=False)
    return list((x + 0.3 * torch.randn(n, 3, 12, 12, generator=g)).split(size))


def _teacher(seed: int = 0) -> Toy:
    """A random Toy whose head standardizes its features, so that its softmax varies from image to image."""
    torch.manual_seed(seed)
    m = Toy()
    data = torch.cat(_batches(256, seed=99))
    with torch.no_grad():
        for bn in m.modules():  # running statistics of the data, as after training; non-trivial affines
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
        m.train()(data)
        m.eval()
        f = m.features(data)
        w = torch.randn(10, f.shape[1]) / f.shape[1] ** 0.5 / (f.std(0) + 1e-6)
        m.head.weight.copy_(w)
        m.head.bias.copy_(-w @ f.mean(0))
    return m


def _compressed(teacher: nn.Module, rank: int = 8) -> torch.fx.GraphModule:
    """The teacher's convs replaced by rank-``rank`` SVD factors (data-free): measurably off."""
    gm = trace(copy.deepcopy(teacher)).gm
    sites = find_sites(gm, include_linear=False)[0]
    plans = {s.fqn: FactorPlan("svd", (rank,)) for s in sites}
    factorize_sites(gm, sites, plans, lambda s, p: decompose_weights(s.weight, s.bias, s.geometry, p)[0])
    return gm.eval()


def _kl(student: nn.Module, teacher: nn.Module, batches: list[Tensor]) -> float:
    with torch.no_grad():
        return output_discrepancy(torch.cat([student(x) for x in batches]), torch.cat([teacher(x) for x in batches]))


def _state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FAST = dict(steps=30, lr=3e-3, batch_size=32, checkpoints=2)


@pytest.mark.parametrize("train,bn", [("all", "frozen"), ("factors", "frozen"), ("factors+bn", "train"),
                                      ("all", "recalibrate")])
def test_distill_lowers_held_out_discrepancy(train: str, bn: str) -> None:
    teacher = _teacher()
    student = _compressed(teacher)
    calib, held = _batches(128, seed=1), _batches(128, seed=2)
    before = _kl(student, teacher, held)
    assert before > 0.05  # the toy compression is measurably off
    res = distill(student, teacher, calib, DistillConfig(**FAST, train=train, bn=bn), held_out=held)
    after = _kl(student, teacher, held)
    assert res.restored is None
    assert res.steps == FAST["steps"] and res.bn == bn
    assert res.kl_after < 0.7 * res.kl_before
    assert after < 0.7 * before  # inputs never passed to distill (only measured through held_out)
    assert res.held_before == pytest.approx(before, rel=1e-4) and res.held_after == pytest.approx(after, rel=1e-4)
    assert not student.training and all(not m.training for m in student.modules())


def test_factors_only_leaves_other_weights_alone() -> None:
    teacher = _teacher()
    student = _compressed(teacher)
    fixed = {k: v for k, v in _state(student).items() if not k.startswith("body.0.") and not k.startswith("body.3.")
             and not k.startswith("body.6.")}
    distill(student, teacher, _batches(64, seed=1), DistillConfig(**{**FAST, "steps": 10}, train="factors"))
    now = _state(student)
    assert all(torch.equal(now[k], v) for k, v in fixed.items())  # BN and head untouched
    assert any(isinstance(m, Factorized) for m in student.modules())


def test_train_set_without_factors_is_an_error() -> None:
    teacher = _teacher()
    with pytest.raises(ConvfxError, match="distill_train='factors'"):
        distill(copy.deepcopy(teacher), teacher, _batches(32, 1), DistillConfig(steps=2, train="factors"))


def test_inputs_only_reads_only_x() -> None:
    class Poison:
        def __getattr__(self, name: str) -> object:
            raise AssertionError("a label was read")

    xs = _batches(64, seed=3)
    batches = [(xs[0], Poison()), [xs[1], Poison(), Poison()]]
    out = inputs_only(batches)
    assert len(out) == 2 and out[0] is xs[0] and out[1] is xs[1]
    assert inputs_only(iter(xs))[1] is xs[1]  # bare tensors, any iterable
    with pytest.raises(ValueError, match="inputs: batch 0"):
        inputs_only([{"x": xs[0]}])


def test_labels_are_neither_needed_nor_accepted() -> None:
    teacher = _teacher()
    xs = _batches(64, seed=3)
    with pytest.raises(ValueError, match="inputs: batch 0.*inputs_only"):
        distill(_compressed(teacher), teacher, [(xs[0], torch.zeros(32, dtype=torch.long))],  # type: ignore[list-item]
                DistillConfig(steps=1))
    with pytest.raises(ValueError, match="inputs: expected a non-empty list"):
        distill(_compressed(teacher), teacher, [], DistillConfig(steps=1))
    res = distill(_compressed(teacher), teacher, xs, DistillConfig(steps=3, batch_size=16))
    assert isinstance(res, DistillResult) and res.steps == 3


@pytest.mark.parametrize("shape", [(5, 3, 16, 16), (2, 1, 7, 9), (3, 3, 1, 1), (4, 2, 8, 3)])
def test_default_augment_keeps_shape(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    y = default_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    again = default_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, again)  # reproducible from the generator
    const = torch.full(shape, 0.7)
    assert torch.allclose(default_augment(const, torch.Generator().manual_seed(1)), const)  # reflect: no borders


def test_default_augment_flips_and_crops() -> None:
    x = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(64, 3, 1, 1)
    y = default_augment(x, torch.Generator().manual_seed(0))
    flipped = y[:, 0, 0, 8] < y[:, 0, 0, 7]  # mid-row values decrease left to right (crop shifts are <= 2)
    assert 16 < int(flipped.sum()) < 48
    assert int((y != x).flatten(1).any(1).sum()) > 48  # most images moved
    for img in y:  # each a window of a (possibly flipped) reflect-padded copy: neighbours differ by 1 / 16
        assert set(img[0].diff(dim=1).abs().unique().tolist()) == {1.0}
        assert set(img[0].diff(dim=0).abs().unique().tolist()) == {16.0}


@pytest.mark.parametrize("x", [torch.randn(4, 10), torch.randn(2, 3, 4, 5, 6), torch.ones(2, 3, 8, 8, dtype=torch.uint8)])
def test_default_augment_leaves_other_tensors(x: Tensor) -> None:
    assert default_augment(x, torch.Generator().manual_seed(0)) is x


class Spy(nn.Module):
    """Wraps the teacher and records every input it is run on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_user_augment_is_called_and_its_output_used() -> None:
    teacher = Spy(_teacher())
    calls: list[tuple[int, ...]] = []

    def zeros(x: Tensor) -> Tensor:
        calls.append(tuple(x.shape))
        return torch.zeros_like(x)

    calib = _batches(64, seed=1)
    res = distill(_compressed(teacher.inner), teacher, calib, DistillConfig(steps=7, batch_size=16, augment=zeros))
    assert res.steps == 7 and calls == [(16, 3, 12, 12)] * 7
    trained_on = [x for x in teacher.seen if x.shape[0] == 16]
    assert len(trained_on) == 7 and all(not x.any() for x in trained_on)

    student = Spy(_compressed(teacher.inner))
    distill(student, teacher.inner, calib, DistillConfig(steps=3, batch_size=16, augment=None, mixup=0.0))
    pool = torch.cat(calib)
    trained_on = [x for x in student.seen if x.shape[0] == 16]
    assert len(trained_on) == 3
    assert all(any(torch.equal(row, p) for p in pool) for x in trained_on for row in x)  # un-augmented rows


def test_failing_augment_leaves_the_student_as_it_was() -> None:
    teacher = _teacher()
    student = _compressed(teacher)
    start = _state(student)
    calls = []

    def flaky(x: Tensor) -> Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("augmentation failed")
        return x

    with pytest.raises(RuntimeError, match="augmentation failed"):
        distill(student, teacher, _batches(64, seed=1), DistillConfig(steps=5, lr=1e-2, batch_size=16, augment=flaky))
    assert _same(_state(student), start)
    assert all(p.requires_grad for p in student.parameters()) and all(p.grad is None for p in student.parameters())
    with pytest.raises(ConvfxError, match="returned list"):
        distill(student, teacher, _batches(64, seed=1), DistillConfig(steps=5, augment=lambda x: [x]))


@pytest.mark.parametrize("kwargs,name", [
    (dict(steps=-1), "distill_steps: expected an int >= 0, got -1"),
    (dict(steps=2.5), "distill_steps"),
    (dict(steps=True), "distill_steps"),
    (dict(lr=0.0), "distill_lr"),
    (dict(lr=-1e-3), "distill_lr"),
    (dict(lr=float("nan")), "distill_lr"),
    (dict(batch_size=0), "distill_batch_size"),
    (dict(temperature=0), "distill_temperature"),
    (dict(temperature=float("inf")), "distill_temperature"),
    (dict(train="bn"), "distill_train"),
    (dict(bn="eval"), "distill_bn"),
    (dict(augment=3), "distill_augment: expected a callable \\(batch\\) -> batch.*got int"),
    (dict(augment="flip"), "distill_augment"),
    (dict(seed="0"), "distill_seed"),
    (dict(checkpoints=0), "distill_checkpoints"),
])
def test_bad_config_values_name_the_argument(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DistillConfig(**kwargs)  # type: ignore[arg-type]


def test_config_accepts_its_choices() -> None:
    for train in TRAIN_SETS:
        for bn in BN_MODES:
            DistillConfig(train=train, bn=bn, augment=None)  # type: ignore[arg-type]
    DistillConfig(augment=lambda x: x, steps=0, lr=1, temperature=2)
    with pytest.raises(ValueError, match="config: expected a DistillConfig"):
        distill(nn.Linear(2, 2), nn.Linear(2, 2), [torch.zeros(1, 2)], {"steps": 1})  # type: ignore[arg-type]


def test_teacher_is_never_modified() -> None:
    teacher = _teacher()
    teacher.train()
    teacher.body[1].eval()  # a mixed mode pattern, restored exactly
    modes = {n: m.training for n, m in teacher.named_modules()}
    teacher.head.weight.requires_grad_(False)
    grads = {n: p.requires_grad for n, p in teacher.named_parameters()}
    state = _state(teacher)
    student = _compressed(_teacher())
    student.train()
    s_modes = {n: m.training for n, m in student.named_modules()}
    s_grads = {n: p.requires_grad for n, p in student.named_parameters()}
    distill(student, teacher, _batches(64, seed=1), DistillConfig(**{**FAST, "steps": 8}, bn="train"))
    assert _same(_state(teacher), state)
    assert {n: m.training for n, m in teacher.named_modules()} == modes
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == grads
    assert all(p.grad is None for p in teacher.parameters())
    assert {n: m.training for n, m in student.named_modules()} == s_modes
    assert {n: p.requires_grad for n, p in student.named_parameters()} == s_grads
    assert all(p.grad is None for p in student.parameters())


def test_diverging_run_restores_best_weights() -> None:
    teacher = _teacher()
    student = _compressed(teacher)
    start = _state(student)
    calib = _batches(64, seed=1)
    res = distill(student, teacher, calib, DistillConfig(steps=40, lr=1e6, batch_size=16, checkpoints=4))
    assert res.restored is not None and "restored" in res.restored
    assert "not finite" in res.restored or "rose" in res.restored
    assert res.restored in res.note()
    assert all(torch.isfinite(v).all() for v in student.state_dict().values() if v.is_floating_point())
    assert res.kl_after <= res.kl_before
    assert _kl(student, teacher, calib) == pytest.approx(res.kl_after, rel=1e-5)
    assert math.isfinite(res.kl_after) and _same(_state(student), start)  # nothing better was seen than the start


def test_never_worse_than_the_start() -> None:
    teacher = _teacher()
    student = copy.deepcopy(teacher)  # already exact: any training can only move it away
    start = _state(student)
    res = distill(student, teacher, _batches(64, seed=1), DistillConfig(steps=6, lr=3e-2, batch_size=16))
    assert res.restored is not None and "starting weights restored" in res.restored
    assert _same(_state(student), start) and res.kl_after == res.kl_before


def test_zero_steps_is_a_no_op() -> None:
    teacher = _teacher()
    student = _compressed(teacher)
    start = _state(student)
    calib = _batches(64, seed=1)
    res = distill(student, teacher, calib, DistillConfig(steps=0))
    assert _same(_state(student), start)
    assert res.steps == 0 and res.restored is None and res.kl_after == res.kl_before
    assert res.kl_before == pytest.approx(_kl(student, teacher, calib), rel=1e-6)
    assert res.note().startswith("distill: 0 label-free steps")


def test_non_logit_outputs_use_relative_mse() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    student = _compressed(teacher, rank=2)
    calib, held = _batches(64, seed=1), _batches(64, seed=2)
    res = distill(student, teacher, calib, DistillConfig(**FAST), held_out=held)
    assert res.restored is None and res.kl_after < res.kl_before
    assert res.held_after is not None and res.held_before is not None and res.held_after < res.held_before


def test_note_is_one_line() -> None:
    res = DistillResult(800, 95.24, 0.412, 0.093, None, "frozen", 1e-3)
    assert res.note() == ("distill: 800 label-free steps in 95.2 s (lr 1e-3, frozen BN), "
                          "calibration output KL 0.412 -> 0.093")
    assert DistillResult(5, 1.0, 0.5, 0.5, "x", "train", 3e-4, 0.6, 0.6).note().endswith("held-out 0.6 -> 0.6; x")


# ------------------------------------------------------------------ through compress(distill_steps=)
def _compress_setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                      nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m, torch.randn(96, 3, 12, 12), torch.randn(64, 3, 12, 12)


def _model_kl(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.kl_div(a(x).log_softmax(1), b(x).log_softmax(1), log_target=True,
                                                reduction="batchmean"))


def test_compress_distill_lowers_the_discrepancy_on_held_out_inputs() -> None:
    m, calib, held = _compress_setup()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kw = dict(rank=0.25, calibration=[calib[:48], calib[48:]], progress=False)
    plain = convfx.compress(m, calib[:1], **kw)
    tuned = convfx.compress(m, calib[:1], distill_steps=150, distill_augment=None,
                            **kw)  # type: ignore[arg-type]
    assert _model_kl(m, tuned, held) < 0.9 * _model_kl(m, plain, held)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the caller's model is untouched
    assert any(n.startswith("distill: ") and "held out" in n for n in tuned.convfx_report.notes)


def test_compress_distill_reads_no_labels_and_honours_the_augment() -> None:
    m, calib, _ = _compress_setup()
    labelled = DataLoader(TensorDataset(calib, torch.randint(0, 10, (96,))), batch_size=48)
    calls = []

    def augment(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x.flip(3)

    kw = dict(rank=0.25, progress=False, distill_steps=20, distill_augment=augment)
    a = convfx.compress(m, calib[:1], calibration=labelled, **kw)  # type: ignore[arg-type]
    n = len(calls)
    b = convfx.compress(m, calib[:1], calibration=[calib[:48], calib[48:]], **kw)  # type: ignore[arg-type]
    assert n == 20 and len(calls) == 40 and all(s[1:] == (3, 12, 12) for s in calls)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_compress_distill_diverging_restores_and_says_so() -> None:
    m, calib, _ = _compress_setup()
    options = convfx.CompressOptions(rank=0.25, calibration=[calib], progress=False, distill_steps=20,
                                     distill_settings={"lr": 1e6})
    gm = convfx.api.compress_with(m, calib[:1], options)
    note = next(n for n in gm.convfx_report.notes if n.startswith("distill: "))
    assert "restored" in note
    assert all(bool(torch.isfinite(p).all()) for p in gm.parameters())


# ------------------------------------------------------------------ losses, mixup, BN on augmented inputs, time limit
def test_mix_blends_the_asked_fraction_of_rows() -> None:
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 2, 3, 3).contiguous()
    y = mix(x, 0.5, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.equal(x, torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand_as(x))
    changed = (y != x).flatten(1).any(1)
    assert int(changed.sum()) <= 4  # 4 rows blended (a blend can land on its own value only by chance)
    for row in y:  # every row is a convex blend of two rows: constant, within the range
        assert row.min() == row.max() and 0 <= float(row.min()) <= 7
    assert torch.equal(mix(x, 0.5, torch.Generator().manual_seed(0)), y)
    one = x[:1]
    assert mix(x, 0.0, torch.Generator()) is x and mix(one, 1.0, torch.Generator()) is one
    ints = torch.ones(4, 3, dtype=torch.long)
    assert mix(ints, 1.0, torch.Generator()) is ints


def test_penultimate_is_the_last_linear() -> None:
    assert penultimate(_teacher()) == "head"
    with pytest.raises(ConvfxError, match="no nn.Linear"):
        penultimate(nn.Sequential(nn.Conv2d(3, 3, 1)))


@pytest.mark.parametrize("settings", [
    dict(feature_weight=1.0),                                   # KL + penultimate features
    dict(kl_weight=0.0, feature_weight=1.0),                    # features only (MiR)
    dict(feature_weight=0.5, features=("body.4", "body.7")),    # BN outputs by name
    dict(bn="augmented"),
    dict(mixup=1.0, temperature=2.0),
])
def test_variants_lower_held_out_discrepancy(settings: dict[str, object]) -> None:
    teacher = _teacher()
    student = _compressed(teacher)
    calib, held = _batches(128, seed=1), _batches(128, seed=2)
    before = _kl(student, teacher, held)
    res = distill(student, teacher, calib, DistillConfig(**{**FAST, **settings}), held_out=held)  # type: ignore[arg-type]
    assert _kl(student, teacher, held) < 0.8 * before
    assert res.held_after is not None and res.held_after < 0.8 * before


def test_feature_taps_are_removed_and_bad_names_are_errors() -> None:
    teacher = _teacher()
    student = _compressed(teacher)
    distill(student, teacher, _batches(64, seed=1), DistillConfig(steps=2, feature_weight=1.0, batch_size=16))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in [*teacher.modules(), *student.modules()])
    with pytest.raises(ConvfxError, match="no module 'body.99'"):
        distill(student, teacher, _batches(64, seed=1),
                DistillConfig(steps=2, feature_weight=1.0, features=("body.99",)))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in [*teacher.modules(), *student.modules()])


def test_time_limit_ends_training_early_and_says_so() -> None:
    teacher = _teacher()
    student = _compressed(teacher)
    calib, held = _batches(128, seed=1), _batches(64, seed=2)
    res = distill(student, teacher, calib, DistillConfig(steps=100000, lr=3e-3, batch_size=32, max_seconds=1.5),
                  held_out=held)
    assert 0 < res.steps < 100000 and res.seconds < 10
    assert res.time_limit == 1.5 and res.planned == 100000
    assert "of 100000 label-free steps (time limit 1.5 s)" in res.note()
    assert res.held_after is not None and res.held_before is not None and res.held_after <= res.held_before
    quick = distill(_compressed(teacher), teacher, calib, DistillConfig(steps=3, batch_size=16, max_seconds=600))
    assert quick.steps == 3 and quick.time_limit is None and "of" not in quick.note().split(" in ")[0]


@pytest.mark.parametrize("kwargs,name", [
    (dict(kl_weight=-1.0), "distill_kl_weight"),
    (dict(feature_weight=float("nan")), "distill_feature_weight"),
    (dict(kl_weight=0.0), "distill_kl_weight: expected a positive kl_weight or feature_weight"),
    (dict(features="last"), "distill_features"),
    (dict(features=()), "distill_features"),
    (dict(features=("a", 3)), "distill_features"),
    (dict(mixup=1.5), "distill_mixup"),
    (dict(mixup=-0.1), "distill_mixup"),
    (dict(max_seconds=0), "distill_max_seconds"),
    (dict(max_seconds=float("inf")), "distill_max_seconds"),
])
def test_bad_new_config_values_name_the_argument(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DistillConfig(**kwargs)  # type: ignore[arg-type]
