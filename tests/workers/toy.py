"""A tiny CNN and generated data shared by the training tests and their worker scripts.

Worker scripts import it as ``toy`` (their own directory is on ``sys.path``); test
modules load it by file path.  Nothing is downloaded.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["AugmentedDataset", "TinyCNN", "make_data", "make_loaders", "make_model", "train_toy"]

NUM_CLASSES = 10


def make_data(n: int = 256, *, seed: int = 0, size: int = 16, num_classes: int = NUM_CLASSES) -> TensorDataset:
    """Random images labelled by a fixed random linear 'teacher' on 4x4-pooled pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    w = torch.randn(num_classes, 3 * 4 * 4, generator=torch.Generator().manual_seed(1234))
    feats = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
    y = (feats @ w.t()).argmax(dim=1)
    return TensorDataset(x, y)


class AugmentedDataset(Dataset):
    """Random flips/noise/shifts drawn from the torch, ``random`` and numpy global RNGs."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        if random.random() < 0.5:
            x = x.flip(-1)
        x = x + 0.1 * torch.randn_like(x)
        shift = int(np.random.randint(-1, 2))
        return x.roll(shift, dims=-2), y


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(16 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).flatten(1)))


def make_model(seed: int = 0, dropout: float = 0.0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(dropout=dropout)


def make_loaders(
    n_train: int = 192, n_val: int = 64, *, batch_size: int = 16, augment: bool = False,
    num_workers: int = 0, drop_last: bool = False,
) -> tuple[DataLoader, DataLoader]:
    train: Dataset = make_data(n_train, seed=1)
    if augment:
        train = AugmentedDataset(train)
    val = make_data(n_val, seed=2)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=drop_last),
        DataLoader(val, batch_size=32, shuffle=False),
    )


def train_toy(
    *,
    ckpt_dir: str | Path | None = None,
    epochs: int = 3,
    n_train: int = 96,
    batch_size: int = 16,
    augment: bool = True,
    dropout: float = 0.2,
    teacher: bool = False,
    lr: float = 0.05,
    schedule: str = "cosine",
    checkpoint_every: int = 1,
    bn_recalibrate: int = 0,
    seed: int = 0,
    callback: Callable[[Any], Any] | None = None,
    dist_timeout_s: float | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The one fine-tuning recipe that worker processes and in-process references share."""
    from convfx.train import finetune

    train_loader, val_loader = make_loaders(n_train=n_train, batch_size=batch_size, augment=augment)
    model = make_model(seed, dropout=dropout)
    result = finetune(
        model, train_loader, val_loader, epochs=epochs, lr=lr, schedule=schedule,
        teacher=make_model(seed + 100) if teacher else None, bn_recalibrate=bn_recalibrate,
        checkpoint_dir=ckpt_dir, checkpoint_every=checkpoint_every, seed=seed, progress=False,
        callback=callback, dist_timeout_s=dist_timeout_s,
    )
    return model, result
