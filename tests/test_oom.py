"""An out-of-memory error during a chunk of path points halves the chunk and retries (simulated on the CPU)."""

import warnings

import pytest
import torch
from torch import nn

import conductance as cd


class RunsOutOfMemory(nn.Module):
    """A small MLP that raises torch.OutOfMemoryError, as a GPU would, when given more than ``limit`` rows."""

    def __init__(self, limit: int):
        super().__init__()
        torch.manual_seed(0)
        self.limit = limit
        self.calls = []
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        self.calls.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} rows (simulated)")
        return self.body(x)


@pytest.mark.parametrize("settings", [dict(n_steps=20), dict(tolerance=1e-3)])
def test_out_of_memory_halves_the_chunk(settings):
    model = RunsOutOfMemory(limit=5).double().eval()
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = cd.layer_conductance(model, x, ["body.1", "body.3"], target=2, internal_batch_size=64, **settings)
    halvings = [str(w.message) for w in caught if "out of memory" in str(w.message)]
    assert halvings and "halved the chunk" in halvings[0] and "internal_batch_size=" in halvings[0]
    assert max(c for c in model.calls if c <= model.limit) <= model.limit
    small = RunsOutOfMemory(limit=5).double().eval()
    ref = cd.layer_conductance(small, x, ["body.1", "body.3"], target=2, internal_batch_size=5, **settings)
    assert max(small.calls) <= 5   # the reference never ran out of memory
    for name in ("body.1", "body.3"):
        assert ref[name].abs().max() > 1e-3
        torch.testing.assert_close(r[name], ref[name], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.n_points, ref.n_points)


def test_out_of_memory_that_halving_cannot_help_is_raised():
    """The forward at the inputs (before the path) runs out of memory on one example: nothing to split."""
    model = RunsOutOfMemory(limit=0).double().eval()
    with pytest.raises(torch.OutOfMemoryError):
        cd.layer_conductance(model, torch.ones(1, 4, dtype=torch.float64), ["body.1"], target=0, n_steps=4)
