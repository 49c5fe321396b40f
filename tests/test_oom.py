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


def _cpu_allocator_error() -> RuntimeError:
    """The real error of the CPU allocator, asked for a petabyte."""
    try:
        torch.empty(2 ** 50, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    pytest.skip("this machine allocated a petabyte")


def test_is_out_of_memory_reads_each_allocator_form():
    """torch.OutOfMemoryError by its type; the plain RuntimeErrors of the allocators that raise no such
    class by their text, the one place the engine reads an exception's message (engine._OOM_MESSAGES)."""
    from conductance.engine import ModifiedInPlace, is_out_of_memory
    cpu = _cpu_allocator_error()
    assert type(cpu) is RuntimeError and "can't allocate memory" in str(cpu)
    assert is_out_of_memory(cpu)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("any text"))       # the same class
    # the MPS allocator's and the memory-limited allocator's messages (these backends are not on this machine)
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9.01 GB, other allocations: "
                                         "0 bytes, max allowed: 9.07 GB). Tried to allocate 64.00 MB on private pool"))
    assert is_out_of_memory(RuntimeError("Failed to allocate 4096 bytes. Memory limit: 1024 bytes. Used: 0 bytes."))
    # other failures, and the allocators' words inside other exception types, are not out of memory
    assert not is_out_of_memory(RuntimeError("view size is not compatible with input tensor's size and stride"))
    assert not is_out_of_memory(RuntimeError("index 7 is out of bounds for dimension 0 with size 3"))
    assert not is_out_of_memory(ValueError("out of memory"))
    assert not is_out_of_memory(ModifiedInPlace("layers ['out of memory'] were modified by an in-place operation"))


class RunsOutOfCPUMemory(RunsOutOfMemory):
    """Above ``limit`` rows the forward asks the real CPU allocator for a petabyte."""

    def forward(self, x):
        self.calls.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            torch.empty(2 ** 50, dtype=torch.uint8)
        return self.body(x)


def test_the_cpu_allocators_error_halves_the_chunk_too():
    _cpu_allocator_error()
    model = RunsOutOfCPUMemory(limit=5).double().eval()
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(cd.ConductanceWarning, match="out of memory evaluating .* halved the chunk"):
        r = cd.layer_conductance(model, x, ["body.1"], target=2, internal_batch_size=64, n_steps=20)
    ref = cd.layer_conductance(RunsOutOfCPUMemory(limit=5).double().eval(), x, ["body.1"], target=2,
                               internal_batch_size=5, n_steps=20)
    assert ref["body.1"].abs().max() > 1e-3
    torch.testing.assert_close(r["body.1"], ref["body.1"], rtol=1e-12, atol=1e-14)
