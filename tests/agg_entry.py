"""Entry points for the aggregate tests run in subprocesses (CLI, kill -9, torchrun).

``conductance aggregate --model agg_entry:model --data agg_entry:data`` with this folder on
PYTHONPATH. Environment knobs: AGG_EXAMPLES (data size, default 45: 6 batches, the last one
smaller), AGG_BATCH (default 8), AGG_SLEEP (seconds per example when it is loaded, to make a
run slow enough to be killed in the middle).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CLASSES = 3


def model() -> nn.Module:
    """A tiny CNN with fixed (seeded) weights: 2 input channels, 6x6 images, 3 classes."""
    g = torch.Generator().manual_seed(1234)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 5, 3, padding=1), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return net.eval()


class SlowTensors(Dataset):
    """Deterministic random images and labels; optionally sleeps when an example is read."""

    def __init__(self, n: int, sleep: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 2, 6, 6, generator=g)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)
        self.sleep = sleep

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if self.sleep:
            time.sleep(self.sleep)
        return self.x[i], self.y[i]


def dataset() -> SlowTensors:
    return SlowTensors(int(os.environ.get("AGG_EXAMPLES", 45)), float(os.environ.get("AGG_SLEEP", 0)))


def data() -> DataLoader:
    """A plain DataLoader in a fixed order (no shuffling): deterministic, as aggregate() requires."""
    return DataLoader(dataset(), batch_size=int(os.environ.get("AGG_BATCH", 8)))


def generic_data():
    """The same batches as data(), from a generator (no length, no batch sampler)."""
    yield from data()
