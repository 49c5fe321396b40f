"""The comparison measures of the paper, from the same engine; how each alternative fails (T1-T5)."""

import pytest
import torch
from torch import nn

import conductance as cd
from models import Chain, CountingModel, random_mlp
from test_closed_form import CASES

ALL = ["conductance", "internal_influence", "activation", "gradient", "grad_x_activation",
       "layer_integrated_gradients"]


@pytest.mark.parametrize("case", list(CASES))
def test_every_measure_on_the_closed_form_cases(case):
    model, x, cond, influence, gxa = CASES[case]
    x = torch.tensor(x)
    r = cd.layer_importance(model, x, "hidden", ALL, tolerance=1e-5, max_steps=400)
    assert set(r) == set(ALL)
    torch.testing.assert_close(r["conductance"]["hidden"][0], torch.tensor(cond), atol=2e-4, rtol=1e-4)
    if influence is not None:
        torch.testing.assert_close(r["internal_influence"]["hidden"][0], torch.tensor(influence), atol=2e-4,
                                   rtol=1e-3)
    if gxa is not None:
        torch.testing.assert_close(r["grad_x_activation"]["hidden"][0], torch.tensor(gxa))
    y = model.hidden(x)
    torch.testing.assert_close(r["activation"]["hidden"], y)
    torch.testing.assert_close(r["grad_x_activation"]["hidden"], r["gradient"]["hidden"] * y)
    lig = r["layer_integrated_gradients"]["hidden"]
    if case == "T6":
        # k1 = relu(x1 - 1) bends along the input path; the straight line from k(x') = (0, 0) to
        # k(x) = (2, 1) keeps F = k1 - k2 linear, so layer IG gives (2, -1), not (1.5, -0.5)
        torch.testing.assert_close(lig[0], torch.tensor([2.0, -1.0]), atol=5e-4, rtol=1e-3)
    else:
        # these layers are linear along the path, so the straight line in their own space is the
        # same path and layer integrated gradients equal conductance
        torch.testing.assert_close(lig, r["conductance"]["hidden"], atol=5e-4, rtol=1e-3)


def test_gradient_values_at_the_input():
    model, x, *_ = CASES["T1 saturation"]
    r = cd.layer_importance(model, torch.tensor(x), "hidden", "gradient")
    assert r["hidden"].item() == 0.0          # saturated: min(y, 1) is flat at y = 2
    model, x, *_ = CASES["T4 polarity"]
    r = cd.layer_importance(model, torch.tensor(x), "hidden", "gradient")
    assert r["hidden"].item() == 1.0


def test_layer_integrated_gradients_differ_from_conductance_when_the_layer_bends():
    """y = (x1^2, x2), F = y1 y2, x = (1, 1): conductance (2/3, 1/3), layer IG (1/2, 1/2)."""
    model = Chain(lambda x: torch.stack([x[:, 0] ** 2, x[:, 1]], dim=1), lambda y: y[:, :1] * y[:, 1:]).eval()
    x = torch.tensor([[1.0, 1.0]])
    r = cd.layer_importance(model, x, "hidden", ["conductance", "layer_integrated_gradients"], n_steps=64)
    torch.testing.assert_close(r["conductance"]["hidden"][0], torch.tensor([2 / 3, 1 / 3]), atol=1e-3, rtol=0)
    torch.testing.assert_close(r["layer_integrated_gradients"]["hidden"][0], torch.tensor([0.5, 0.5]),
                               atol=1e-3, rtol=0)
    # both are complete on this cut
    for m in r.values():
        assert m.relative_error["hidden"].item() < 1e-3


def test_layer_ig_equals_conductance_for_an_affine_layer():
    model = random_mlp(seed=11)
    x = torch.randn(4, 5)
    r = cd.layer_importance(model, x, "0", ["conductance", "layer_integrated_gradients"], n_steps=24)
    assert r["conductance"]["0"].abs().max() > 1e-2
    torch.testing.assert_close(r["layer_integrated_gradients"]["0"], r["conductance"]["0"], rtol=1e-4, atol=1e-5)


def test_path_measures_share_one_run():
    model = CountingModel(random_mlp(seed=12)).eval()
    x = torch.randn(3, 5)
    model.calls.clear()
    both = cd.layer_importance(model, x, ["inner.1", "inner.3"], ["conductance", "internal_influence"], n_steps=10)
    rows_both = sum(c.shape[0] for c in model.calls)
    model.calls.clear()
    one = cd.layer_importance(model, x, ["inner.1", "inner.3"], "conductance", n_steps=10)
    rows_one = sum(c.shape[0] for c in model.calls)
    assert rows_both == rows_one
    torch.testing.assert_close(both["conductance"]["inner.3"], one["inner.3"])
    assert both["internal_influence"]["inner.3"].abs().max() > 0


def test_insensitivity_and_how_activation_fails_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[2].weight[:, 1] = 0.0
    x = torch.randn(5, 3) + 1
    r = cd.layer_importance(model, x, "1", ALL[:5], target=0, n_steps=16)
    for m in ("conductance", "internal_influence", "gradient", "grad_x_activation"):
        assert torch.equal(r[m]["1"][:, 1], torch.zeros(5)), m
    assert r["activation"]["1"][:, 1].abs().min() > 0   # activation ignores what F uses


def test_linearity_in_the_explained_function_for_every_path_measure():
    model = random_mlp(seed=13)
    x = torch.randn(3, 5)
    a, b = 1.5, -2.0
    names = ["conductance", "internal_influence", "gradient", "grad_x_activation"]
    mix = cd.layer_importance(model, x, "3", names, n_steps=12, target=lambda out: a * out[:, 0] + b * out[:, 2])
    r0 = cd.layer_importance(model, x, "3", names, n_steps=12, target=0)
    r2 = cd.layer_importance(model, x, "3", names, n_steps=12, target=2)
    for m in names:
        torch.testing.assert_close(mix[m]["3"], a * r0[m]["3"] + b * r2[m]["3"], rtol=1e-4, atol=1e-6)


def test_unknown_measure_is_a_clear_error():
    model = random_mlp(seed=1)
    with pytest.raises(ValueError, match="unknown measure.*choose from"):
        cd.layer_importance(model, torch.randn(2, 5), "1", "saliency")



def test_layer_integrated_gradients_of_a_layer_that_is_not_a_cut_meet_the_tolerance_per_unit():
    """No completeness check exists for a branch; its per-unit estimate steers the adaptive rule
    (before per-unit errors this was refused)."""
    from models import TwoBranch
    model = TwoBranch().eval()
    x = torch.randn(2, 4) * 2
    r = cd.layer_importance(model, x, "left", "layer_integrated_gradients", tolerance=0.01, max_steps=1000)
    assert not r.is_cut["left"]
    fine = cd.layer_importance(model.double(), x.double(), "left", "layer_integrated_gradients", target=r.target,
                               n_steps=4000)
    model.float()
    dist = (r["left"].double() - fine["left"]).norm(dim=1) / fine["left"].norm(dim=1)
    assert (r.unit_error["left"] <= 0.01).all() and (dist <= 0.015).all()
