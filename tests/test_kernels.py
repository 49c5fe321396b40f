"""conductance.kernels: the fused CPU kernel for channel units' trapezoid interval sums (needs numba)."""

import math

import pytest
import torch

import conductance as cd
from conductance import engine, kernels, measures
from models import random_cnn

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def one_thread():
    # the kernels stand aside above MAX_THREADS torch threads (tested below);
    # every other test here runs where they apply, whatever the machine's core count
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def literal(y0, g0, y1, g1, w0=0.5, w1=0.5):
    """Each channel's sum of (w0 g0 + w1 g1) * (y1 - y0), written out in float64 element by element
    (the trapezoid rule by default; (1, 0) is the left sum, (0, 1) the right sum)."""
    m, c = y0.shape[:2]
    out = torch.zeros(m, c, dtype=torch.float64)
    Y0, G0, Y1, G1 = (t.double().reshape(m, c, -1).tolist() for t in (y0, g0, y1, g1))
    for i in range(m):
        for j in range(c):
            ends = zip(G0[i][j], G1[i][j], Y1[i][j], Y0[i][j])
            out[i, j] = math.fsum((w0 * a + w1 * b) * (d - e) for a, b, d, e in ends)
    return out


def four(shape, dtype=torch.float32, memory_format=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(4)]
    if memory_format is not None:
        ts = [t.contiguous(memory_format=memory_format) for t in ts]
    return ts


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("shape, layout", [
    ((3, 5, 4, 6), None), ((3, 5, 4, 6), torch.channels_last), ((2, 7, 9), None),
    ((2, 3, 2, 3, 4), torch.channels_last_3d), ((1, 16, 1, 1), None), ((4, 3, 33, 2), None)])
def test_kernel_equals_the_written_out_sum(shape, layout, dtype, tol):
    y0, g0, y1, g1 = four(shape, dtype, layout)
    got = kernels.channel_trapezoid(y0, g0, y1, g1)
    assert got is not None and got.dtype == dtype and got.shape == shape[:2]
    want = literal(y0, g0, y1, g1)
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("layout", [None, torch.channels_last])
def test_left_and_right_sums_equal_the_written_out_sums(layout):
    y0, g0, y1, g1 = four((3, 5, 4, 6), torch.float32, layout, seed=1)
    got = kernels.channel_left_right(y0, g0, y1, g1)
    assert got is not None
    for sums, weights in zip(got, [(1.0, 0.0), (0.0, 1.0)]):
        want = literal(y0, g0, y1, g1, *weights)
        assert sums.dtype == torch.float32 and (sums.double() - want).abs().max() <= 1e-6 * want.abs().max()
    # their mean is the trapezoid rule
    torch.testing.assert_close((got[0] + got[1]) / 2, kernels.channel_trapezoid(y0, g0, y1, g1), rtol=1e-5, atol=1e-6)


def test_kernel_reads_channels_last_3d_tensors_as_laid_out():
    # (m, C, L) with the channels innermost in memory: a transposed view
    base = [torch.randn(2, 11, 6) for _ in range(4)]
    y0, g0, y1, g1 = (t.transpose(1, 2) for t in base)
    got = kernels.channel_trapezoid(y0, g0, y1, g1)
    assert got is not None
    torch.testing.assert_close(got.double(), literal(y0, g0, y1, g1), rtol=1e-6, atol=1e-6)


def test_nan_and_inf_reach_the_sums():
    # the engine finds non-finite values and gradients from the conductance sums (engine.py), so the
    # kernel's compiler flags must not assume finite numbers
    for layout in (None, torch.channels_last):
        for bad in (float("nan"), float("inf")):
            y0, g0, y1, g1 = four((2, 4, 3, 5), memory_format=layout)
            g1[1, 2, 0, 3] = bad
            got = kernels.channel_trapezoid(y0, g0, y1, g1)
            assert got is not None
            finite = torch.isfinite(got)
            assert not finite[1, 2] and int(finite.sum()) == got.numel() - 1
            # a value reaches both the left and the right sums, a gradient only its own side's
            y1[0, 1, 2, 2] = bad
            left, right = kernels.channel_left_right(y0, g0, y1, g1)
            assert not torch.isfinite(left[0, 1]) and not torch.isfinite(right[0, 1])
            assert torch.isfinite(left[1, 2]) and not torch.isfinite(right[1, 2])
            assert int(torch.isfinite(left).sum()) == left.numel() - 1


@pytest.mark.parametrize("case", ["strided view", "mixed layouts", "bfloat16", "two dims", "shapes differ"])
def test_kernel_stands_aside_where_it_does_not_apply(case):
    y0, g0, y1, g1 = four((2, 4, 6, 6))
    if case == "strided view":
        y0 = y0[:, :, ::2]
        g0, y1, g1 = g0[:, :, ::2], y1[:, :, ::2], g1[:, :, ::2]
    elif case == "mixed layouts":
        g0 = g0.contiguous(memory_format=torch.channels_last)
    elif case == "bfloat16":
        y0, g0, y1, g1 = (t.bfloat16() for t in (y0, g0, y1, g1))
    elif case == "two dims":
        y0, g0, y1, g1 = (t.flatten(1) for t in (y0, g0, y1, g1))
    else:
        y1 = y1[:, :3]
    assert kernels.channel_trapezoid(y0, g0, y1, g1) is None
    assert kernels.channel_left_right(y0, g0, y1, g1) is None


def test_kernel_stands_aside_beyond_its_thread_count():
    ts = four((2, 4, 6, 6))
    torch.set_num_threads(kernels.MAX_THREADS + 1)
    assert kernels.channel_trapezoid(*ts) is None and kernels.channel_left_right(*ts) is None
    torch.set_num_threads(1)
    assert kernels.channel_trapezoid(*ts) is not None and kernels.channel_left_right(*ts) is not None


@pytest.mark.parametrize("names", [["conductance"], ["conductance", "internal_influence"]])
def test_interval_sums_with_the_kernel_equal_the_torch_operations(names, monkeypatch):
    fns = {n: getattr(measures, n) for n in names}
    y0, g0, y1, g1 = four((3, 6, 5, 5), memory_format=torch.channels_last)
    width = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    fused = engine.interval_contributions(fns, y0, g0, y1, g1, width, "trapezoid", "channel", engine.Scratch())
    fused_lr = engine.left_and_right_contributions(fns, y0, g0, y1, g1, width, "channel", engine.Scratch())
    monkeypatch.setattr(kernels, "channel_trapezoid", lambda *a: None)
    monkeypatch.setattr(kernels, "channel_left_right", lambda *a: None)
    plain = engine.interval_contributions(fns, y0, g0, y1, g1, width, "trapezoid", "channel", engine.Scratch())
    plain_lr = engine.left_and_right_contributions(fns, y0, g0, y1, g1, width, "channel", engine.Scratch())
    assert set(fused) == set(plain) == set(names)
    for n in names:
        torch.testing.assert_close(fused[n], plain[n], rtol=1e-5, atol=1e-6)
        for side in (0, 1):
            torch.testing.assert_close(fused_lr[side][n], plain_lr[side][n], rtol=1e-5, atol=1e-6)
    # and the conductance sums are the written-out ones
    torch.testing.assert_close(fused["conductance"].double(), literal(y0, g0, y1, g1), rtol=1e-6, atol=1e-6)


def test_every_rule_uses_the_kernel_and_gives_the_same_values_without_it(monkeypatch):
    model = random_cnn(seed=3).eval()
    x = torch.randn(3, 2, 6, 6)
    calls = {"channel_trapezoid": [], "channel_left_right": []}

    def counting(name):
        original, seen = getattr(kernels, name), calls[name]

        def wrapper(*args):
            out = original(*args)
            seen.append(out is not None)
            return out
        return wrapper

    for name in calls:
        monkeypatch.setattr(kernels, name, counting(name))
    runs = {"adaptive": dict(tolerance=1e-3, max_steps=200), "gausslegendre": dict(n_steps=31),
            "captum": dict(method="captum", n_steps=31)}
    with_kernel = {k: cd.layer_conductance(model, x, ["0", "2"], units="channel", **kw) for k, kw in runs.items()}
    assert all(seen and all(seen) for seen in calls.values())
    monkeypatch.setattr(kernels, "channel_trapezoid", lambda *a: None)
    monkeypatch.setattr(kernels, "channel_left_right", lambda *a: None)
    without = {k: cd.layer_conductance(model, x, ["0", "2"], units="channel", **kw) for k, kw in runs.items()}
    for k in runs:
        assert with_kernel[k].n_points.tolist() == without[k].n_points.tolist()
        for layer in ("0", "2"):
            torch.testing.assert_close(with_kernel[k][layer], without[k][layer], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(with_kernel[k].unit_error[layer], without[k].unit_error[layer],
                                       rtol=1e-4, atol=1e-7)
