"""Small hand-weighted and random models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class Lambda(nn.Module):
    """A named layer computing a fixed function, so it can be hooked by name."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Chain(nn.Module):
    """x -> hidden (the observed layer) -> head; the output is one scalar per example."""

    def __init__(self, hidden, head):
        super().__init__()
        self.hidden = Lambda(hidden) if not isinstance(hidden, nn.Module) else hidden
        self.head = Lambda(head) if not isinstance(head, nn.Module) else head

    def forward(self, x):
        return self.head(self.hidden(x))


def t9_model() -> nn.Module:
    """PAPER.md T9: identity, a 3->4 linear layer with ReLU, and a 4->2 linear layer."""

    class T9(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0 = nn.Linear(3, 3, bias=False)
            self.lin1 = nn.Linear(3, 4)
            self.relu = nn.ReLU()
            self.lin2 = nn.Linear(4, 2)
            with torch.no_grad():
                self.lin0.weight.copy_(torch.eye(3))
                self.lin1.weight.fill_(1.0)
                self.lin1.bias.copy_(torch.tensor([-10.0, 1.0, 1.0, 1.0]))
                self.lin2.weight.fill_(1.0)
                self.lin2.bias.copy_(torch.tensor([-1.0, 1.0]))

        def forward(self, x):
            return self.lin2(self.relu(self.lin1(self.lin0(x))))

    return T9().eval()


def random_mlp(seed: int = 0, n_in: int = 5, hidden: int = 7, n_out: int = 4, act=nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, n_out)).eval()


def random_cnn(seed: int = 0, act=nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), act(), nn.Conv2d(4, 5, 3, padding=1), act(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 3)).eval()


class TwoBranch(nn.Module):
    """An Inception-like block: two parallel branches, concatenated; each branch alone is not a cut."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.left = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
        self.right = nn.Sequential(nn.Linear(4, 2), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        block = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(block)


class CountingModel(nn.Module):
    """Wraps a model and records every batch of rows it is called with."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def forward(self, x):
        self.calls.append(x.detach().clone())
        return self.inner(x)
