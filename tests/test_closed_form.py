"""PAPER.md's closed-form cases T1-T9: values that only the right maths produces."""

import pytest
import torch
from torch import nn

import conductance as cd
from conductance.attribute import path_attribution
from models import Chain, t9_model

TIGHT = dict(tolerance=1e-5, max_steps=400)


def measures(model, x, layer, names=("conductance", "internal_influence"), **kw):
    """Conductance and internal influence from one path run (adaptive, tight)."""
    settings = dict(baselines=None, target=None, additional_forward_args=None, forward_kwargs=None,
                    n_steps=None, method=None, tolerance=1e-5, max_steps=400, units="neuron",
                    internal_batch_size=None, attribute_to_layer_input=False)
    settings.update(kw)
    r = path_attribution(model, x, layer, list(names), **settings)
    return r


def grad_x_act(model, x, layer):
    store = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o: store.setdefault("y", o))
    out = model(x.requires_grad_(True))
    handle.remove()
    (g,) = torch.autograd.grad(out.sum(), store["y"])
    return (g * store["y"]).detach(), store["y"].detach()


def scalar_chain(hidden, head):
    return Chain(hidden, head).eval()


CASES = {
    # id: (model, x, expected conductance, internal influence, grad*act)
    "T1 saturation": (scalar_chain(lambda x: 2 * x, lambda y: torch.clamp(y, max=1.0)), [[1.0]], [1.0], [0.5], [0.0]),
    "T2 overshoot": (scalar_chain(lambda x: x, lambda y: torch.relu(y - 1)), [[1.01]], [0.01], [0.01 / 1.01], [1.01]),
    "T3 sign flip": (scalar_chain(lambda x: x, lambda y: 3 * torch.relu(y - 1) - y), [[1.2]], [-0.6], [-0.5], [2.4]),
    "T4 polarity": (scalar_chain(lambda x: -x, lambda y: y), [[1.0]], [-1.0], [1.0], [-1.0]),
    "T5": (scalar_chain(torch.relu, lambda h: torch.relu(h[:, :1] - 1 - h[:, 1:])), [[3.0, 1.0]],
           [1.5, -0.5], [0.5, -0.5], [3.0, -1.0]),
    "T6": (scalar_chain(lambda x: torch.relu(x - torch.tensor([1.0, 0.0])), lambda k: torch.relu(k[:, :1] - k[:, 1:])),
           [[3.0, 1.0]], [1.5, -0.5], None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_measures(case):
    model, x, cond, influence, gxa = CASES[case]
    x = torch.tensor(x)
    r = measures(model, x, "hidden")
    torch.testing.assert_close(r["hidden"][0], torch.tensor(cond), atol=2e-4, rtol=1e-4)
    if influence is not None:
        torch.testing.assert_close(r.extra["internal_influence"]["hidden"][0], torch.tensor(influence),
                                   atol=2e-4, rtol=1e-3)
    if gxa is not None:
        torch.testing.assert_close(grad_x_act(model, x.clone(), "hidden")[0][0], torch.tensor(gxa))
    # the hidden layer is a cut, so the conductances add up to F(x) - F(x')
    assert r.is_cut["hidden"]
    torch.testing.assert_close(r["hidden"].sum(1), r.output_diff, atol=1e-4, rtol=1e-4)


def test_t5_per_input_neuron_conductance():
    model, x, *_ = CASES["T5"]
    per_input = cd.neuron_conductance(model, torch.tensor(x), "hidden", [0, 1], tolerance=1e-5, max_steps=400)
    torch.testing.assert_close(per_input[:, 0], torch.tensor([[1.5, 0.0], [0.0, -0.5]]), atol=2e-3, rtol=1e-3)


def test_t7_linearity_of_the_explained_function():
    torch.manual_seed(3)
    f1 = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    f2 = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 1))

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.f1, self.f2 = f1, f2

        def forward(self, x):
            return torch.cat([self.f1(x), self.f2(x)], dim=1)

    model = Mix().eval()
    x = torch.randn(4, 3)
    base = torch.randn(4, 3)
    a, b = 2.5, -0.7
    combined = cd.layer_conductance(model, x, ["f1", "f2", "f1.1"], baselines=base, n_steps=40,
                                    target=lambda out: a * out[:, 0] + b * out[:, 1])
    with torch.no_grad():
        d1 = (f1(x) - f1(base)).squeeze(1)
        d2 = (f2(x) - f2(base)).squeeze(1)
    # a unit's own output: Cond = a (f1(x) - f1(x')), exactly, for any grid with both end points
    torch.testing.assert_close(combined["f1"].squeeze(1), a * d1)
    torch.testing.assert_close(combined["f2"].squeeze(1), b * d2)
    # conductance is linear in F: Cond_{aF1 + bF2} = a Cond_F1 + b Cond_F2 on the same grid
    one = cd.layer_conductance(model, x, "f1.1", baselines=base, n_steps=40, target=0)
    two = cd.layer_conductance(model, x, "f1.1", baselines=base, n_steps=40, target=1)
    assert one["f1.1"].abs().max() > 1e-2
    torch.testing.assert_close(combined["f1.1"], a * one["f1.1"] + b * two["f1.1"])


def test_t8_insensitivity_exactly_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[2].weight[:, 1] = 0.0       # unit 1: no outgoing weights (F does not depend on it)
        model[0].weight[2] = 0.0          # unit 2: constant (does not depend on x)
        model[0].bias[2] = 0.8
    x = torch.randn(5, 3)
    for kw in (dict(), dict(n_steps=7), dict(method="captum", n_steps=7), dict(method="uniform_left", n_steps=5)):
        r = cd.layer_conductance(model, x, "1", target=0, **kw)
        assert torch.equal(r["1"][:, 1], torch.zeros(5))
        assert torch.equal(r["1"][:, 2], torch.zeros(5))
        assert r["1"][:, [0, 3]].abs().min() > 0  # the other units do carry attribution


T9_EXPECTED = {"lin0": [0.0, 390.0, 0.0], "lin1": [90.0, 100.0, 100.0, 100.0],
               "relu": [90.0, 100.0, 100.0, 100.0], "lin2": [390.0, 0.0]}


def test_t9_layer_conductance_all_layers_in_one_call():
    model = t9_model()
    r = cd.layer_conductance(model, torch.tensor([[0.0, 100.0, 0.0]]), list(T9_EXPECTED), target=0, **TIGHT)
    torch.testing.assert_close(r.output_diff, torch.tensor([390.0]))
    for name, expected in T9_EXPECTED.items():
        torch.testing.assert_close(r[name][0], torch.tensor(expected), atol=5e-3, rtol=1e-4)
        assert r.is_cut[name]


def test_t9_neuron_conductance_through_inputs():
    model = t9_model()
    unit0 = cd.neuron_conductance(model, torch.tensor([[0.0, 100.0, 0.0]]), "lin1", [0], target=0, **TIGHT)
    torch.testing.assert_close(unit0[0, 0], torch.tensor([0.0, 90.0, 0.0]), atol=1e-2, rtol=1e-4)
    relu3 = cd.neuron_conductance(model, torch.tensor([[0.0, 70.0, 30.0]]), "relu", [3], target=0, n_steps=20)
    torch.testing.assert_close(relu3[0, 0], torch.tensor([0.0, 70.0, 30.0]))
    literal = cd.reference.neuron_conductance(model, torch.tensor([0.0, 100.0, 0.0]), "lin1", target=0,
                                              n_steps=1000)
    torch.testing.assert_close(literal[0], torch.tensor([0.0, 90.0, 0.0]), atol=1e-3, rtol=1e-4)


def test_t9_captum_rule_is_biased_without_end_points():
    """Captum's default grid never reaches a = 0 or 1, so it loses part of every linear change."""
    model = t9_model()
    r = cd.layer_conductance(model, torch.tensor([[0.0, 100.0, 0.0]]), "relu", target=0, method="captum",
                             n_steps=10)
    assert abs(r["relu"][0, 1].item() - 100.0) > 1.0
    exact = cd.layer_conductance(model, torch.tensor([[0.0, 100.0, 0.0]]), "relu", target=0, method="uniform",
                                 n_steps=10)
    torch.testing.assert_close(exact["relu"][0, 1:], torch.full((3,), 100.0))
