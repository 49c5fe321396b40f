"""Neuron conductance: per-input attribution of many units from shared passes."""

import pytest
import torch
from torch import nn

import conductance as cd
from models import random_cnn, random_mlp


def test_many_units_equal_one_at_a_time_and_shapes():
    model = random_cnn(seed=0)
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 6)
    units = [(0, 1, 2), (3, 5, 5), (2, 0, 0)]
    together = cd.neuron_conductance(model, x, "3", units, target=1, n_steps=10)
    assert together.shape == (3, 2, 2, 6, 6)
    for i, u in enumerate(units):
        alone = cd.neuron_conductance(model, x, "3", [u], target=1, n_steps=10)
        torch.testing.assert_close(together[i], alone[0])
    channels = cd.neuron_conductance(model, x, "3", [0, 4], units="channel", target=1, n_steps=10,
                                     internal_batch_size=7)
    assert channels.shape == (2, 2, 2, 6, 6)
    per_position = cd.neuron_conductance(model, x, "3", [(0, i, j) for i in range(6) for j in range(6)],
                                         target=1, n_steps=10)
    torch.testing.assert_close(channels[0], per_position.sum(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("units", ["neuron", "channel"])
def test_sum_over_inputs_approaches_layer_conductance(units):
    model = random_cnn(seed=1)
    torch.manual_seed(1)
    x = torch.randn(2, 2, 6, 6)
    chosen = [(1, 2, 3), (4, 0, 5)] if units == "neuron" else [1, 4]
    per_input = cd.neuron_conductance(model, x, "3", chosen, units=units, target=0, n_steps=200,
                                      method="gausslegendre")
    layer = cd.layer_conductance(model, x, "3", units=units, target=0, n_steps=200)["3"]
    for i, u in enumerate(chosen):
        expected = layer[(slice(None),) + ((u,) if units == "channel" else u)]
        assert expected.abs().min() > 1e-4
        torch.testing.assert_close(per_input[i].flatten(1).sum(1), expected, rtol=5e-3, atol=1e-5)


def test_all_units_of_a_cut_layer_add_up_to_integrated_gradients():
    """T10: sum over a cut layer of Cond^y_i is IG_i, for each input i."""
    model = random_mlp(seed=3)
    torch.manual_seed(3)
    x = torch.randn(1, 5) * 2
    per_input = cd.neuron_conductance(model, x, "2", list(range(7)), target=2, tolerance=1e-5, max_steps=400)
    ig = cd.reference.integrated_gradients(model, x[0], target=2, n_steps=64, rule="gausslegendre")
    assert ig.abs().max() > 1e-2
    torch.testing.assert_close(per_input.sum(0)[0], ig, rtol=1e-3, atol=1e-4)


def test_matches_literal_reference_per_input():
    model = random_mlp(seed=4)
    torch.manual_seed(4)
    x = torch.randn(1, 5)
    ours = cd.neuron_conductance(model, x, "1", [0, 3, 6], target=0, n_steps=64)
    literal = cd.reference.neuron_conductance(model, x[0], "1", target=0, n_steps=64, rule="gausslegendre")
    torch.testing.assert_close(ours[:, 0], literal[[0, 3, 6]], rtol=1e-3, atol=1e-5)


def test_adaptive_grid_is_refined_for_the_input_side_integral():
    """After a layer followed by a linear map, the layer's completeness holds on any grid, but the
    units' attributions through the inputs still need a fine grid: the default must refine on the
    input's integrated gradients too (on the layer alone it stopped at 6% error here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 6) * 2
    units = [0, 3, 5]
    got = cd.neuron_conductance(model, x, "3", units)
    fine = cd.neuron_conductance(model.double(), x.double(), "3", units, n_steps=3000)
    model.float()
    assert ((got.double() - fine).abs().max() / fine.abs().max()).item() < 0.03
