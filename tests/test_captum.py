"""``method="captum"`` reproduces Captum 0.9's LayerConductance and NeuronConductance.

Models are small, seeded and deliberately non-degenerate: their outputs differ across classes
and examples, and the attributions compared are far from zero, so agreement cannot come from
comparing zero with zero. Captum is always called unbatched (its ``internal_batch_size`` path
is a different computation); ours must not depend on ``internal_batch_size``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

captum_attr = pytest.importorskip("captum.attr")

import conductance as cd  # noqa: E402

LayerConductance = captum_attr.LayerConductance
NeuronConductance = captum_attr.NeuronConductance

RTOL = 1e-5
N_STEPS = 24

pytestmark = pytest.mark.filterwarnings("ignore::conductance.ConductanceWarning")


# --------------------------------------------------------------------------- models


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),      # 0, 1
        nn.Conv2d(6, 8, 3), nn.Tanh(),                 # 2, 3
        nn.Conv2d(8, 8, 3), nn.ReLU(),                 # 4, 5
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),         # 6, 7
    )
    with torch.no_grad():  # larger weights than the default init, so the logits are well apart
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(2.5)
    return model.eval()


def make_mlp() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(),     # 0, 1
        nn.Linear(16, 12), nn.ReLU(),    # 2, 3
        nn.Linear(12, 4),                # 4
    )
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(2.0)
    return model.eval()


@pytest.fixture(scope="module")
def cnn():
    model = make_cnn()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    target = torch.tensor([0, 3, 4])
    return model, x, target, ["0", "2", "3", "4", "7"]


@pytest.fixture(scope="module")
def mlp():
    model = make_mlp()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(11))
    target = torch.tensor([0, 1, 2, 3, 1])
    return model, x, target, ["0", "1", "2", "3", "4"]


CASES = ["cnn", "mlp"]


@pytest.fixture
def case(request):
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------- helpers


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """max |ours - ref| <= rtol * max |ref|, with ``ref`` required to be far from zero."""
    ref = ref.detach()
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = ref.abs().max().item()
    assert scale > 1e-3, f"{what}: reference is (nearly) zero; the comparison would be meaningless"
    err = (ours - ref).abs().max().item() / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:g}"


def module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def captum_layer(model, x, name, target, to_input=False, n_steps=N_STEPS):
    lc = LayerConductance(model, module(model, name))
    attr, delta = lc.attribute(x, target=target, n_steps=n_steps, return_convergence_delta=True,
                               attribute_to_layer_input=to_input)
    return attr.detach(), delta.detach()


# --------------------------------------------------------------------------- the models are not degenerate


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_models_are_not_degenerate(case):
    model, x, target, _ = case
    with torch.no_grad():
        out = model(x)
    # classes differ within each example, examples differ for each class
    assert out.std(dim=1).min() > 0.1
    assert out.std(dim=0).min() > 0.1
    # the explained logits move along the path, differently per example
    with torch.no_grad():
        at_baseline = model(torch.zeros_like(x))
        diff = out.gather(1, target[:, None]).squeeze(1) - at_baseline.gather(1, target[:, None]).squeeze(1)
    assert diff.abs().min() > 0.05
    assert diff.std() > 0.05
    # the targets are not all the same class
    assert target.unique().numel() >= 3


# --------------------------------------------------------------------------- LayerConductance


@pytest.mark.parametrize("to_input", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("case", CASES, indirect=True)
def test_layer_conductance_matches_captum(case, to_input):
    """All layers in one of our calls equal one Captum call per layer, and so do the deltas."""
    model, x, target, layers = case
    ours = cd.layer_conductance(model, x, layers, target=target, n_steps=N_STEPS, method="captum",
                                attribute_to_layer_input=to_input)
    assert ours.method == "captum" and ours.n_steps == N_STEPS
    assert (ours.n_points == N_STEPS + 1).all()
    assert list(ours) == layers
    for name in layers:
        ref, ref_delta = captum_layer(model, x, name, target, to_input=to_input)
        assert_rel_close(ours[name], ref, f"layer {name} ({'input' if to_input else 'output'})")
        # attributions are substantial compared with what is being explained
        assert ref.flatten(1).abs().sum(1).min() > 0.1 * ours.output_diff.abs().min()
        # Captum's grid never reaches the ends of the path, so its delta is far from zero here:
        # comparing ours with it is a real check of both the sum and F(x) - F(x')
        scale = (ref.flatten(1).abs().sum(1) + ours.output_diff.abs()).max().item()
        assert ref_delta.abs().max() > 1e-3
        torch.testing.assert_close(ours.delta[name], ref_delta, rtol=0, atol=RTOL * scale)
    assert not ours[layers[0]].requires_grad


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_default_target_is_top_logit_like_captum_with_argmax(case):
    model, x, _, layers = case
    with torch.no_grad():
        top = model(x).argmax(1)
    ours = cd.layer_conductance(model, x, layers[:3], n_steps=N_STEPS, method="captum")
    assert torch.equal(ours.target, top)
    for name in layers[:3]:
        ref, _ = captum_layer(model, x, name, top)
        assert_rel_close(ours[name], ref, f"layer {name}, target=None")


def test_targets_matter(cnn):
    """Sanity for the comparisons above: a different target gives a clearly different answer."""
    model, x, target, _ = cnn
    a = cd.layer_conductance(model, x, "4", target=target, n_steps=N_STEPS, method="captum")["4"]
    b = cd.layer_conductance(model, x, "4", target=(target + 1) % 5, n_steps=N_STEPS, method="captum")["4"]
    assert (a - b).abs().max() > 0.1 * a.abs().max()


def test_captum_rule_differs_from_our_default_rule(mlp):
    """The captum rule really is a different quadrature (so matching Captum is not a coincidence)."""
    model, x, target, layers = mlp
    ours_captum = cd.layer_conductance(model, x, "2", target=target, n_steps=N_STEPS, method="captum")
    ours_gl = cd.layer_conductance(model, x, "2", target=target, n_steps=N_STEPS, method="gausslegendre")
    diff = (ours_captum["2"] - ours_gl["2"]).abs().max()
    assert diff > 100 * RTOL * ours_gl["2"].abs().max()
    # and ours includes both ends of the path, so its completeness error is smaller
    assert ours_gl.delta["2"].abs().max() < ours_captum.delta["2"].abs().max()


@pytest.mark.parametrize("to_input", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("case", CASES, indirect=True)
def test_internal_batch_size_does_not_change_the_result(case, to_input):
    """Chunk sizes that do not divide the number of points (25 x batch) give the same result,
    which is Captum's unbatched result."""
    model, x, target, layers = case
    full = cd.layer_conductance(model, x, layers, target=target, n_steps=N_STEPS, method="captum",
                                attribute_to_layer_input=to_input)
    n_points = (N_STEPS + 1) * x.shape[0]
    for size in (7, 13, n_points - 1):
        assert n_points % size != 0
        part = cd.layer_conductance(model, x, layers, target=target, n_steps=N_STEPS, method="captum",
                                    internal_batch_size=size, attribute_to_layer_input=to_input)
        for name in layers:
            assert_rel_close(part[name], full[name], f"layer {name}, internal_batch_size={size}", rtol=1e-6)
            torch.testing.assert_close(part.delta[name], full.delta[name], rtol=0,
                                       atol=1e-6 * full.output_diff.abs().max().item())
        torch.testing.assert_close(part.output_diff, full.output_diff)
    name = layers[2]
    ref, _ = captum_layer(model, x, name, target, to_input=to_input)
    last = cd.layer_conductance(model, x, name, target=target, n_steps=N_STEPS, method="captum",
                                internal_batch_size=7, attribute_to_layer_input=to_input)
    assert_rel_close(last[name], ref, f"layer {name}, internal_batch_size=7 vs Captum unbatched")


@pytest.mark.parametrize("n_steps", [1, 5])
def test_layer_conductance_matches_captum_few_steps(mlp, n_steps):
    """Few steps, where the grid's missing ends matter most."""
    model, x, target, layers = mlp
    ours = cd.layer_conductance(model, x, layers, target=target, n_steps=n_steps, method="captum")
    for name in layers:
        ref, ref_delta = captum_layer(model, x, name, target, n_steps=n_steps)
        assert_rel_close(ours[name], ref, f"layer {name}, n_steps={n_steps}")
        scale = (ref.flatten(1).abs().sum(1) + ours.output_diff.abs()).max().item()
        torch.testing.assert_close(ours.delta[name], ref_delta, rtol=0, atol=RTOL * scale)


def test_layer_conductance_matches_captum_with_baselines(cnn):
    model, x, target, layers = cnn
    base = 0.3 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(12))
    ours = cd.layer_conductance(model, x, layers, target=target, baselines=base, n_steps=N_STEPS,
                                method="captum")
    for name in layers:
        lc = LayerConductance(model, module(model, name))
        ref = lc.attribute(x, baselines=base, target=target, n_steps=N_STEPS).detach()
        assert_rel_close(ours[name], ref, f"layer {name}, tensor baselines")


# --------------------------------------------------------------------------- NeuronConductance


@pytest.mark.parametrize("layer_name, neurons", [
    ("2", [(0, 2, 3), (5, 0, 0), (7, 3, 1), (3, 5, 5)]),
    ("4", [(4, 1, 2), (7, 2, 1), (1, 3, 1)]),
])
def test_neuron_conductance_matches_captum_cnn(cnn, layer_name, neurons):
    model, x, target, _ = cnn
    ours = cd.neuron_conductance(model, x, layer_name, neurons, target=target, n_steps=N_STEPS,
                                 method="captum")
    assert ours.shape == (len(neurons),) + tuple(x.shape)
    nc = NeuronConductance(model, module(model, layer_name))
    refs = []
    for k, n in enumerate(neurons):
        ref = nc.attribute(x, n, target=target, n_steps=N_STEPS).detach()
        assert_rel_close(ours[k], ref, f"layer {layer_name} neuron {n}")
        refs.append(ref)
    # the neurons are really different from each other
    for a in range(len(refs)):
        for b in range(a + 1, len(refs)):
            assert (refs[a] - refs[b]).abs().max() > 0.1 * max(refs[a].abs().max(), refs[b].abs().max())


@pytest.mark.parametrize("to_input", [False, True], ids=["output", "input"])
def test_neuron_conductance_matches_captum_mlp(mlp, to_input):
    model, x, target, _ = mlp
    neurons = [0, 5, 9, (2,)]
    ours = cd.neuron_conductance(model, x, "2", neurons, target=target, n_steps=N_STEPS, method="captum",
                                 attribute_to_layer_input=to_input)
    nc = NeuronConductance(model, module(model, "2"))
    for k, n in enumerate(neurons):
        ref = nc.attribute(x, n, target=target, n_steps=N_STEPS, attribute_to_neuron_input=to_input).detach()
        assert_rel_close(ours[k], ref, f"mlp layer 2 neuron {n} ({'input' if to_input else 'output'})")


def test_neuron_conductance_internal_batch_size(cnn):
    model, x, target, _ = cnn
    neurons = [(0, 2, 3), (7, 3, 1)]
    full = cd.neuron_conductance(model, x, "2", neurons, target=target, n_steps=N_STEPS, method="captum")
    for size in (11,):
        part = cd.neuron_conductance(model, x, "2", neurons, target=target, n_steps=N_STEPS, method="captum",
                                     internal_batch_size=size)
        assert_rel_close(part, full, f"neuron conductance, internal_batch_size={size}", rtol=1e-6)


def test_neuron_conductance_default_target_like_captum(mlp):
    model, x, _, _ = mlp
    with torch.no_grad():
        top = model(x).argmax(1)
    ours = cd.neuron_conductance(model, x, "3", [2, 9], n_steps=N_STEPS, method="captum")
    nc = NeuronConductance(model, module(model, "3"))
    for k, n in enumerate([2, 9]):
        ref = nc.attribute(x, n, target=top, n_steps=N_STEPS).detach()
        assert_rel_close(ours[k], ref, f"mlp layer 3 neuron {n}, target=None")
