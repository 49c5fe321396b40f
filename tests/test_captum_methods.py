"""Captum's method names give Captum 0.9's numbers for every measure Captum has.

``method="captum"`` is each Captum class's default and each ``"riemann_*"`` name is that Captum
method, for LayerConductance, InternalInfluence, LayerIntegratedGradients and NeuronConductance.
The models (from tests/test_captum.py) are seeded and non-degenerate; every comparison is
against a Captum result far from zero, and the rules are checked to differ from each other, so
agreement cannot come from a shared trivial answer.
"""

from __future__ import annotations

import pytest
import torch

captum_attr = pytest.importorskip("captum.attr")

import conductance as cd  # noqa: E402
from conductance.paths import captum_point_rule, fixed_grid  # noqa: E402
from test_captum import assert_rel_close, make_cnn, make_mlp, module  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::conductance.ConductanceWarning")

N_STEPS = 12
OURS = ["captum", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
LAYER_CAPTUM_NAME = {"captum": "gausslegendre"}          # Captum's own name for its default
NEURON_CAPTUM_NAME = {"captum": "riemann_trapezoid"}     # NeuronConductance's default


@pytest.fixture(scope="module")
def cnn():
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    return make_cnn(), x, torch.tensor([0, 3, 4]), ["2", "4"]


@pytest.fixture(scope="module")
def mlp():
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(11))
    return make_mlp(), x, torch.tensor([0, 1, 2, 3, 1]), ["0", "3"]


@pytest.fixture(params=["cnn", "mlp"])
def case(request):
    return request.getfixturevalue(request.param)


CAPTUM_CLASSES = {
    "conductance": "LayerConductance",
    "internal_influence": "InternalInfluence",
    "layer_integrated_gradients": "LayerIntegratedGradients",
}


@pytest.mark.parametrize("measure", list(CAPTUM_CLASSES))
@pytest.mark.parametrize("method", OURS)
def test_layer_measures_match_captum(case, method, measure):
    model, x, target, layers = case
    ours = cd.layer_importance(model, x, layers, measure, target=target, n_steps=N_STEPS, method=method)
    assert ours.method == method and ours.measure == measure
    cls = getattr(captum_attr, CAPTUM_CLASSES[measure])
    for name in layers:
        ref = cls(model, module(model, name)).attribute(x, target=target, n_steps=N_STEPS,
                                                         method=LAYER_CAPTUM_NAME.get(method, method))
        assert_rel_close(ours[name], ref.detach(), f"{measure} {method} layer {name}")


@pytest.mark.parametrize("method", OURS)
def test_layer_conductance_and_its_delta_match_captum(cnn, method):
    """layer_conductance itself, with Captum's convergence delta (F(x) - F(x') from the model,
    since most of Captum's grids miss an end of the path)."""
    model, x, target, layers = cnn
    ours = cd.layer_conductance(model, x, layers, target=target, n_steps=N_STEPS, method=method)
    for name in layers:
        lc = captum_attr.LayerConductance(model, module(model, name))
        ref, ref_delta = lc.attribute(x, target=target, n_steps=N_STEPS, return_convergence_delta=True,
                                      method=LAYER_CAPTUM_NAME.get(method, method))
        assert_rel_close(ours[name], ref.detach(), f"{method} layer {name}")
        scale = ours.output_diff.abs().max().item()
        torch.testing.assert_close(ours.delta[name], ref_delta.detach(), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("method", OURS)
def test_neuron_conductance_matches_captum(cnn, method):
    model, x, target, _ = cnn
    neurons = [(0, 2, 3), (5, 1, 4)]
    ours = cd.neuron_conductance(model, x, "2", neurons, target=target, n_steps=N_STEPS, method=method)
    nc = captum_attr.NeuronConductance(model, module(model, "2"))
    for k, n in enumerate(neurons):
        ref = nc.attribute(x, n, target=target, n_steps=N_STEPS, method=NEURON_CAPTUM_NAME.get(method, method))
        assert_rel_close(ours[k], ref.detach(), f"neuron {n}, {method}")


def test_internal_influence_to_layer_input_and_baselines(cnn):
    model, x, target, _ = cnn
    base = 0.3 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(12))
    for method in ("captum", "riemann_middle"):
        ours = cd.layer_importance(model, x, "4", "internal_influence", target=target, baselines=base,
                                   n_steps=N_STEPS, method=method, attribute_to_layer_input=True)
        ref = captum_attr.InternalInfluence(model, module(model, "4")).attribute(
            x, baselines=base, target=target, n_steps=N_STEPS, method=LAYER_CAPTUM_NAME.get(method, method),
            attribute_to_layer_input=True)
        assert_rel_close(ours["4"], ref.detach(), f"internal influence at the layer input, {method}")


def test_channel_units_sum_captum_over_space(cnn):
    model, x, target, _ = cnn
    ours = cd.layer_importance(model, x, "2", "layer_integrated_gradients", target=target, n_steps=N_STEPS,
                               method="captum", units="channel")
    ref = captum_attr.LayerIntegratedGradients(model, module(model, "2")).attribute(x, target=target,
                                                                                    n_steps=N_STEPS)
    assert_rel_close(ours["2"], ref.detach().sum((2, 3)), "LIG per channel")


def test_the_rules_really_differ(cnn):
    """Each Captum name is a different computation here, as in Captum (so matching is no accident)."""
    model, x, target, _ = cnn
    for measure in CAPTUM_CLASSES:
        got = {m: cd.layer_importance(model, x, "4", measure, target=target, n_steps=N_STEPS, method=m)["4"]
               for m in OURS + ["gausslegendre"]}
        for a in got:
            for b in got:
                if a < b:
                    scale = max(got[a].abs().max(), got[b].abs().max())
                    assert (got[a] - got[b]).abs().max() > 1e-4 * scale, (measure, a, b)


def test_internal_influence_captum_needs_its_own_run(mlp):
    """Asked together, conductance keeps LayerConductance's rule and internal influence Captum's
    InternalInfluence rule (different points), each equal to Captum's."""
    model, x, target, _ = mlp
    both = cd.layer_importance(model, x, "3", ["conductance", "internal_influence"], target=target,
                               n_steps=N_STEPS, method="riemann_right")
    for measure in ("conductance", "internal_influence"):
        alone = cd.layer_importance(model, x, "3", measure, target=target, n_steps=N_STEPS,
                                    method="riemann_right")
        assert_rel_close(both[measure]["3"], alone["3"], measure, rtol=1e-6)
    assert (both["conductance"].n_points == N_STEPS + 1).all()
    assert (both["internal_influence"].n_points == N_STEPS).all()


def test_grids_are_captums():
    """Positions and weights are exactly those of Captum's approximation_methods."""
    from captum.attr._utils.approximation_methods import approximation_parameters
    for name in OURS[1:] + ["gausslegendre"]:
        steps_fn, alphas_fn = approximation_parameters(name)
        ours_name = "captum" if name == "gausslegendre" else name
        alphas, weights = captum_point_rule(ours_name, 7, "internal_influence")
        assert alphas.tolist() == pytest.approx(alphas_fn(7), abs=1e-15)
        assert weights.tolist() == pytest.approx(steps_fn(7), abs=1e-15)
        if name != "gausslegendre":
            assert fixed_grid(name, 7).alphas.tolist() == pytest.approx(alphas_fn(8), abs=1e-15)


def test_errors_name_captum_methods(mlp):
    model, x, target, _ = mlp
    with pytest.raises(cd.ConductanceError, match="riemann_left.*our 'gausslegendre'"):
        cd.layer_conductance(model, x, "3", n_steps=4, method="riemann")
    with pytest.raises(cd.ConductanceError, match="riemann_left.*at least 2 path points"):
        cd.neuron_conductance(model, x, "3", [1], n_steps=1, method="riemann_left")
    with pytest.raises(cd.ConductanceError, match="tolerance"):
        cd.layer_conductance(model, x, "3", tolerance=0.01, method="riemann_trapezoid")
