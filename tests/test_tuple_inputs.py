"""Multi-input models: a tuple of input tensors, each on its own path from its own baseline (float64)."""

import pytest
import torch
from torch import nn

import conductance as cd

captum_attr = pytest.importorskip("captum.attr")


class TwoInputs(nn.Module):
    """f(x, y, scale): x (batch, 3) and y (batch, 2, 2) meet after their own linear maps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(4, 5)
        self.h = nn.Sequential(nn.Tanh(), nn.Linear(5, 6), nn.Tanh())
        self.out = nn.Linear(6, 2)

    def forward(self, x, y, scale=1.0):
        return self.out(self.h(self.a(x) + scale * self.b(y.flatten(1))))


@pytest.fixture(scope="module")
def two():
    model = TwoInputs().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    bx = 0.1 * torch.randn(3, generator=g, dtype=torch.float64)   # one baseline shared by the examples
    by = torch.zeros(3, 2, 2, dtype=torch.float64)
    return model, x, y, bx, by


def test_tuple_inputs_equal_captum_layer_conductance(two):
    model, x, y, bx, by = two
    ours = cd.layer_conductance(model, (x, y), ["a", "h.1", "h"], baselines=(bx, by), target=1, n_steps=20,
                                method="captum", additional_forward_args=(0.5,))
    for name, module in [("a", model.a), ("h.1", model.h[1]), ("h", model.h)]:
        ref = captum_attr.LayerConductance(model, module).attribute(
            (x, y), baselines=(bx.expand(3, 3), by), target=1, n_steps=20, additional_forward_args=(0.5,))
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(ours[name], ref, rtol=1e-5, atol=1e-12)
    # block outputs are cuts: completeness holds with the adaptive rule, through both inputs' paths
    r = cd.layer_conductance(model, (x, y), ["h"], baselines=(bx, by), target=1, tolerance=1e-4,
                             additional_forward_args=(0.5,))
    with torch.no_grad():
        want = model(x, y, 0.5)[:, 1] - model(bx.expand(3, 3), by, 0.5)[:, 1]
    torch.testing.assert_close(r["h"].sum(1), want, rtol=2e-4, atol=1e-10)


@pytest.mark.filterwarnings("ignore::conductance.errors.ConductanceWarning")  # 20 Captum points
def test_tuple_inputs_neuron_conductance_one_attribution_per_input(two):
    model, x, y, bx, by = two
    ours = cd.neuron_conductance(model, (x, y), "h.1", [2, 4], baselines=(bx, by), target=1, n_steps=20,
                                 method="captum", additional_forward_args=(0.5,))
    assert isinstance(ours, tuple) and [t.shape for t in ours] == [(2, 3, 3), (2, 3, 2, 2)]
    for row, neuron in enumerate([2, 4]):
        ref = captum_attr.NeuronConductance(model, model.h[1]).attribute(
            (x, y), neuron_selector=neuron, baselines=(bx.expand(3, 3), by), target=1, n_steps=20,
            additional_forward_args=(0.5,))
        for ours_i, ref_i in zip(ours, ref):
            assert ref_i.abs().max() > 1e-4
            torch.testing.assert_close(ours_i[row], ref_i, rtol=1e-5, atol=1e-9)


def test_tuple_inputs_bad_arguments(two):
    model, x, y, bx, _ = two
    with pytest.raises(cd.ConductanceError, match="1 baselines for 2 inputs"):
        cd.layer_conductance(model, (x, y), ["h"], baselines=(bx,), target=1, n_steps=4)
    with pytest.raises(cd.ConductanceError, match="baselines must be a tuple too"):
        cd.layer_conductance(model, (x, y), ["h"], baselines=bx, target=1, n_steps=4)
    with pytest.raises(cd.ConductanceError, match=r"baselines\[1\]: baselines of shape \(5,\)"):
        cd.layer_conductance(model, (x, y), ["h"], baselines=(bx, torch.zeros(5)), target=1, n_steps=4)
    with pytest.raises(cd.ConductanceError, match="share the batch size"):
        cd.layer_conductance(model, (x, y[:2]), ["h"], target=1, n_steps=4)
    with pytest.raises(TypeError, match=r"inputs\[1\]: inputs have dtype torch.int64"):
        cd.layer_conductance(model, (x, torch.ones(3, 2, 2, dtype=torch.long)), ["h"], target=1, n_steps=4)
