"""conductance.measures as a module: the two path measures and the measure name lists."""

import torch

from conductance import measures


def _interval():
    torch.manual_seed(0)
    gbar, dy = torch.randn(3, 4), torch.randn(3, 4)
    width = torch.tensor([0.1, 0.25, 0.5]).view(3, 1)       # one interval width per row, broadcast over units
    return gbar, dy, width


def test_conductance_is_gradient_times_change_written_into_out():
    gbar, dy, width = _interval()
    out = torch.empty(3, 4)
    got = measures.conductance(gbar, dy, width, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch.tensor([[g * d for g, d in zip(gr, dr)] for gr, dr in
                                                  zip(gbar.tolist(), dy.tolist())]))


def test_internal_influence_is_gradient_times_width_written_into_out():
    gbar, dy, width = _interval()
    out = torch.empty(3, 4)
    got = measures.internal_influence(gbar, dy, width, out)
    assert got.data_ptr() == out.data_ptr()
    for row, w in enumerate([0.1, 0.25, 0.5]):
        torch.testing.assert_close(out[row], gbar[row] * w)


def test_a_left_sum_of_each_measure_integrates_a_linear_path():
    # y(a) = a * v and dF/dy constant g: conductance integrates g * v da = g * v, influence g
    g, v = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    alphas = torch.linspace(0, 1, 6)
    cond = torch.zeros(2)
    infl = torch.zeros(2)
    for a0, a1 in zip(alphas[:-1], alphas[1:]):
        width = (a1 - a0).view(1)
        cond += measures.conductance(g, (a1 - a0) * v, width, torch.empty(2))
        infl += measures.internal_influence(g, (a1 - a0) * v, width, torch.empty(2))
    torch.testing.assert_close(cond, g * v)
    torch.testing.assert_close(infl, g)


def test_measure_names():
    assert set(measures.PATH_MEASURES) == {"conductance", "internal_influence"}
    assert len(set(measures.MEASURES)) == len(measures.MEASURES) == 6
    assert measures.LIG in measures.MEASURES and not set(measures.POINT_MEASURES) & set(measures.PATH_MEASURES)
