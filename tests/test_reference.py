"""conductance.reference, the slow literal formulas, on cases with a closed form (PAPER.md).

A linear layer y = W x + b followed by the head F = sum_j c_j y_j^2 / 2 has dF/dy_j = c_j y_j, and
along the straight input path y_j(a) = y'_j + a (y_j - y'_j). So

    Cond^{y_j}_i = W_ji (x_i - x'_i) c_j integral y_j(a) da = W_ji (x_i - x'_i) c_j (y_j + y'_j) / 2,

linear in a inside the integral, so both of the reference's rules (midpoint, Gauss-Legendre) are exact.
"""

import pytest
import torch
from torch import nn

from conductance import reference


class QuadHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.register_buffer("c", c)

    def forward(self, y):
        return (self.c * y ** 2 / 2).sum(-1, keepdim=True)


def _model():
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    return nn.Sequential(lin, QuadHead(torch.tensor([1.0, -2.0, 0.5, 3.0])))


@pytest.mark.parametrize("rule", ["midpoint", "gausslegendre"])
def test_neuron_and_layer_conductance_equal_the_closed_form(rule):
    model = _model()
    lin, c = model[0], model[1].c
    x, base = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.2, 0.1, -0.3])
    y, y0 = lin(x).detach(), lin(base).detach()
    expected = lin.weight.detach() * (x - base) * (c * (y + y0) / 2)[:, None]          # (units, inputs)
    got = reference.neuron_conductance(model, x, "0", baseline=base, n_steps=3, rule=rule)
    assert got.shape == (4, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    layer = reference.layer_conductance(model, x, "0", baseline=base, n_steps=3, rule=rule)
    torch.testing.assert_close(layer, c * (y ** 2 - y0 ** 2) / 2, rtol=1e-5, atol=1e-6)
    # completeness: the units' conductances add up to F(x) - F(x')
    torch.testing.assert_close(layer.sum(), (model(x) - model(base)).squeeze(), rtol=1e-5, atol=1e-6)


def test_target_picks_an_output_and_the_default_baseline_is_zero():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    x = torch.tensor([0.7, -1.2])
    W1, W2 = model[0].weight.detach(), model[1].weight.detach()
    # all linear: Cond^{y_j} = W2[t, j] * (W1 x)_j for a zero baseline (the bias cancels)
    for t in (0, 1):
        got = reference.layer_conductance(model, x, "0", target=t, n_steps=2)
        torch.testing.assert_close(got, W2[t] * (W1 @ x), rtol=1e-5, atol=1e-6)
    by_callable = reference.layer_conductance(model, x, "0", target=lambda out: out[:, 1] - out[:, 0], n_steps=2)
    torch.testing.assert_close(by_callable, (W2[1] - W2[0]) * (W1 @ x), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_of_the_quadratic_head():
    model = _model()
    lin, c = model[0], model[1].c
    x, base = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.2, 0.1, -0.3])
    y, y0 = lin(x).detach(), lin(base).detach()
    # IG_i = sum_j of the neuron conductances over units j (the paper's eq. 2 summed over y)
    expected = (lin.weight.detach() * (c * (y + y0) / 2)[:, None]).sum(0) * (x - base)
    got = reference.integrated_gradients(model, x, baseline=base, n_steps=4, rule="gausslegendre")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_callers_model_is_left_as_it_was():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    handle = model[0].register_forward_hook(lambda m, a, out: seen.append(1))
    try:
        reference.layer_conductance(model, torch.ones(3), "0", n_steps=2)
        reference.integrated_gradients(model, torch.ones(3), n_steps=2)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model[1].c.dtype == torch.float32
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert list(model[0]._forward_hooks) == [handle.id]    # the user's hook only, none of ours
        assert seen    # the float64 copy keeps the user's hooks (deepcopy), so it ran the model as the user set it up
    finally:
        handle.remove()


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown rule 'simpson'"):
        reference.layer_conductance(_model(), torch.ones(3), "0", rule="simpson")


@pytest.mark.parametrize("rule", ["midpoint", "gausslegendre"])
@pytest.mark.parametrize("n_steps", [0, -3, 2.5])
def test_a_grid_without_points_is_refused(rule, n_steps):
    # midpoint with n_steps=0 used to divide by zero; integrated_gradients returned zeros silently
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        reference.layer_conductance(_model(), torch.ones(3), "0", n_steps=n_steps, rule=rule)
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        reference.integrated_gradients(_model(), torch.ones(3), n_steps=n_steps, rule=rule)
