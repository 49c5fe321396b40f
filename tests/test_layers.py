"""conductance.layers as a module: resolving layer names, picking and replacing output elements."""

from collections import namedtuple

import pytest
import torch
from torch import nn

from conductance.errors import ConductanceError
from conductance.layers import LayerRef, replace_element, resolve_layers, select_element


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.encoder = nn.Sequential(nn.Linear(5, 5), nn.ReLU())
        self.fc2 = nn.Linear(5, 2)


@pytest.fixture
def net():
    return Net()


def test_names_and_modules_resolve_to_the_same_layer(net):
    by_name, by_module = resolve_layers(net, ["encoder.0", net.fc1])
    assert (by_name.name, by_name.module, by_name.element, by_name.use_input) == ("encoder.0", net.encoder[0],
                                                                                  None, False)
    assert (by_module.name, by_module.module) == ("fc1", net.fc1)
    (single,) = resolve_layers(net, "fc2")
    assert single.module is net.fc2


def test_element_in_brackets_and_as_a_pair(net):
    ref, = resolve_layers(net, "lstm[0]")
    assert (ref.name, ref.module, ref.element) == ("lstm[0]", net.lstm, 0)
    ref, = resolve_layers(net, "lstm[hidden]")
    assert ref.element == "hidden" and ref.name == "lstm[hidden]"
    ref, = resolve_layers(net, "lstm[-1]")
    assert ref.element == -1
    ref, = resolve_layers(net, (net.lstm, 1))
    assert (ref.name, ref.element) == ("lstm[1]", 1)


def test_input_suffix_and_use_input(net):
    ref, = resolve_layers(net, "fc2:input")
    assert (ref.name, ref.module, ref.use_input) == ("fc2:input", net.fc2, True)
    ref, = resolve_layers(net, "lstm[1]:input")
    assert (ref.element, ref.use_input) == (1, True)
    refs = resolve_layers(net, ["fc1", "fc2"], use_input=True)
    assert all(r.use_input for r in refs)
    # a layer and its input are different sites, so both may be asked for at once
    assert [r.name for r in resolve_layers(net, ["fc2", "fc2:input"])] == ["fc2", "fc2:input"]


def test_a_typo_suggests_close_names(net):
    with pytest.raises(ValueError, match=r"no layer named 'fc_1'.*Did you mean 'fc1'"):
        resolve_layers(net, "fc_1")
    with pytest.raises(ValueError, match=r"'encoder\.0'"):
        resolve_layers(net, "encodr.0")


def test_duplicates_are_refused(net):
    with pytest.raises(ValueError, match="'fc1' was requested twice"):
        resolve_layers(net, ["fc1", net.fc1])
    with pytest.raises(ValueError, match=r"'lstm\[0\]' was requested twice"):
        resolve_layers(net, ["lstm[0]", (net.lstm, 0)])


def test_foreign_modules_ints_and_empty_lists_are_refused(net):
    with pytest.raises(ValueError, match="not part of the model"):
        resolve_layers(net, nn.Linear(3, 4))
    with pytest.raises(ConductanceError, match="pass its name, the string '2'"):
        resolve_layers(net, 2)
    with pytest.raises(ConductanceError, match="each of layers"):
        resolve_layers(net, ["fc1", 3.5])
    with pytest.raises(ValueError, match="no layers given"):
        resolve_layers(net, [])


def test_a_layer_ref_is_taken_as_it_is(net):
    given = LayerRef("custom", net.fc1, None, True)
    assert resolve_layers(net, [given]) == [given]


Pair = namedtuple("Pair", ["out", "state"])


def _ref(element, use_input=False):
    return LayerRef("m" if element is None else f"m[{element}]", nn.Identity(), element, use_input)


def test_select_element_from_each_container():
    a, b = torch.ones(2), torch.zeros(3)
    assert select_element(_ref(1), (a, b)) is b
    assert select_element(_ref(0), [a, b]) is a
    assert select_element(_ref("state"), {"out": a, "state": b}) is b
    assert select_element(_ref(1), Pair(a, b)) is b
    assert select_element(_ref(-1), (a, b)) is b
    assert select_element(_ref(None), a) is a


def test_select_element_explains_what_is_wrong():
    a = torch.ones(2, 3)
    with pytest.raises(ConductanceError, match=r"returns a tuple, not a tensor; .*'m\[0\]'"):
        select_element(_ref(None), (a, a))
    with pytest.raises(ConductanceError, match=r"receives a dict.*'m\[x\]'"):
        select_element(_ref(None, use_input=True), {"x": a})
    with pytest.raises(ConductanceError, match=r"tensor of shape \(2, 3\), not a tuple.*'m'"):
        select_element(_ref(0), a)
    with pytest.raises(ConductanceError, match="cannot select element 5"):
        select_element(_ref(5), (a, a))
    with pytest.raises(ConductanceError, match="element 1 is a NoneType, not a tensor"):
        select_element(_ref(1), (a, None))


def test_replace_element_keeps_the_container_type():
    a, b, new = torch.ones(1), torch.zeros(1), torch.full((1,), 7.0)
    assert replace_element(_ref(None), a, new) is new
    t = replace_element(_ref(1), (a, b), new)
    assert type(t) is tuple and t[0] is a and t[1] is new
    p = replace_element(_ref(0), Pair(a, b), new)
    assert type(p) is Pair and p.out is new and p.state is b
    original = [a, b]
    lst = replace_element(_ref(1), original, new)
    assert lst == [a, new] and original[1] is b       # a copy: the module's own list is not changed
    d = {"out": a, "state": b}
    d2 = replace_element(_ref("out"), d, new)
    assert d2["out"] is new and d2["state"] is b and d["out"] is a
    with pytest.raises(ConductanceError, match="cannot replace element 0 of a Tensor"):
        replace_element(_ref(0), a, new)
