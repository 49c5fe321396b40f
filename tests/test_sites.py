"""conductance.sites: record / intervene on sites, their hooks, their messages, their context."""

from __future__ import annotations

import contextvars
import pathlib
import re
import threading
import warnings

import pytest
import torch
from torch import nn

import conductance as cd
from conductance import sites
from conductance.errors import ConductanceError, ConductanceWarning
from models import random_mlp


class Block(nn.Module):
    """Takes a keyword mask, returns a tuple (hidden, gate) and a dict holding both."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, *, mask: torch.Tensor) -> tuple:
        h = torch.tanh(self.lin(x)) * scale * mask
        return h, {"gate": torch.sigmoid(h), "hidden": h}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = Block()
        self.head = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, d = self.block(x, torch.tensor(2.0), mask=mask)
        return self.head(h + d["gate"])


class Shared(nn.Module):
    """One linear layer applied twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture
def net() -> Net:
    return Net().eval()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 4, generator=g), (torch.rand(3, 4, generator=g) > 0.3).float()


def manual(net: Net, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every site's value, computed by hand from the weights."""
    h = torch.tanh(net.block.lin(x)) * 2.0 * mask
    gate = torch.sigmoid(h)
    return {"h": h, "gate": gate, "head_in": h + gate, "out": net.head(h + gate)}


# --------------------------------------------------------------------------- record


def test_record_output_element_and_input_sites(net, data):
    x, mask = data
    want = manual(net, x, mask)
    with torch.no_grad(), sites.record(net, ["block[0]", "block.lin:input", "block[mask]:input", "block[1]:input",
                                             "head:input", "block.lin"]) as rec:
        out = net(x, mask)
    rec.require()
    assert torch.equal(out, want["out"]), "recording must not change the forward"
    assert torch.equal(rec.values["block[0]"], want["h"])
    assert torch.equal(rec.values["block.lin:input"], x)
    assert torch.equal(rec.values["block[mask]:input"], mask)            # a keyword argument
    assert float(rec.values["block[1]:input"]) == 2.0                    # the second positional argument
    assert torch.equal(rec.values["head:input"], want["head_in"])
    assert torch.equal(rec.values["block.lin"], net.block.lin(x))
    assert not any(v.requires_grad for v in rec.values.values())
    assert no_hooks(net)


def test_record_dict_element_inside_tuple_is_refused_with_the_fix(net, data):
    x, mask = data
    with pytest.raises(ConductanceError, match=r"'block' returns a tuple, not a tensor.*'block\[0\]'"):
        with sites.record(net, "block"):
            net(x, mask)
    assert no_hooks(net)


def test_record_at_input_and_module_objects(net, data):
    x, mask = data
    with torch.no_grad(), sites.record(net, [net.head, net.block.lin], at_input=True) as rec:
        net(x, mask)
    assert set(rec.values) == {"head", "block.lin"}
    assert torch.equal(rec.values["head"], manual(net, x, mask)["head_in"])
    assert torch.equal(rec.values["block.lin"], x)


def test_record_with_grad_gives_the_gradient_at_the_site():
    torch.manual_seed(3)
    model = random_mlp(seed=3)
    x = torch.randn(2, 5)
    with sites.record(model, "3", grad=True, cut_below=True) as rec:
        out = model(x).sum()
    (g,) = torch.autograd.grad(out, rec.values["3"])
    # the output is linear in layer 3's value: d sum(W y + b) / dy = column sums of W, for every example
    assert torch.allclose(g, model[4].weight.sum(0).expand(2, -1))
    assert torch.is_grad_enabled()
    # the cut: nothing below layer 3 was recorded by autograd
    assert rec.values["3"].grad_fn is None and rec.values["3"].is_leaf


def test_record_replace_stands_in_for_the_value():
    model = random_mlp(seed=4)
    x = torch.randn(2, 5)
    stand_in = torch.full((2, 7), 0.25)
    with sites.record(model, "1", grad=True, replace={"1": stand_in}) as rec:
        out = model(x)
    assert torch.equal(rec.values["1"].detach(), stand_in)
    with torch.no_grad():
        assert torch.allclose(out, model[4](model[3](model[2](stand_in))))


def test_record_options_need_grad():
    model = random_mlp()
    with pytest.raises(ConductanceError, match="need grad=True"):
        with sites.record(model, "1", cut_below=True):
            pass
    assert no_hooks(model)


# --------------------------------------------------------------------------- intervene


def test_intervene_replaces_output_element_and_inputs(net, data):
    x, mask = data
    want = manual(net, x, mask)
    # zero unit 1 of the block's hidden output: the head sees h with that column 0 (the gate is unchanged)
    h0 = want["h"].clone()
    h0[:, 1] = 0

    def zero_unit(t):
        t = t.clone()
        t[:, 1] = 0
        return t

    with torch.no_grad(), sites.intervene(net, {"block[0]": zero_unit}) as state:
        out = net(x, mask)
    assert state.calls == {"block[0]": 1}
    assert torch.allclose(out, net.head(h0 + want["gate"]))
    # an input site: the keyword mask replaced by ones
    with torch.no_grad(), sites.intervene(net, {"block[mask]:input": torch.ones_like}):
        out = net(x, mask)
    assert torch.allclose(out, manual(net, x, torch.ones_like(mask))["out"])
    # the first positional input of the head, doubled
    with torch.no_grad(), sites.intervene(net, {"head:input": lambda t: 2 * t}):
        out = net(x, mask)
    assert torch.allclose(out, net.head(2 * want["head_in"]))
    assert no_hooks(net)


def test_intervene_none_observes_without_change(net, data):
    x, mask = data
    seen = []
    with torch.no_grad(), sites.intervene(net, {"block.lin": seen.append}):
        out = net(x, mask)
    assert torch.equal(out, manual(net, x, mask)["out"])
    assert len(seen) == 1 and torch.equal(seen[0], net.block.lin(x))


def test_intervene_whole_output_and_whole_input(net, data):
    x, mask = data
    want = manual(net, x, mask)

    def gate_twice(output):
        h, d = output
        return d["gate"], {"gate": d["gate"], "hidden": h}

    with torch.no_grad(), sites.intervene(net, {"block": gate_twice}, whole=True):
        out = net(x, mask)
    assert torch.allclose(out, net.head(2 * want["gate"]))
    with torch.no_grad(), sites.intervene(net, {"block": lambda o: (o[0] * 0, o[1])}, whole=True):
        out = net(x, mask)
    assert torch.allclose(out, net.head(want["gate"]))

    def scale_args(args, kwargs):
        return (args[0], torch.tensor(0.0)), kwargs

    with torch.no_grad(), sites.intervene(net, {"block": scale_args}, at_input=True, whole=True):
        out = net(x, mask)
    assert torch.allclose(out, net.head(torch.full_like(want["h"], 0.5)))   # h = 0, gate = sigmoid(0)


def test_intervene_prepend_runs_before_hooks_already_there(net, data):
    x, mask = data
    seen = []
    handle = net.block.lin.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad(), sites.intervene(net, {"block.lin": torch.zeros_like}, prepend=True):
            net(x, mask)
        with torch.no_grad(), sites.intervene(net, {"block.lin": torch.zeros_like}):
            net(x, mask)
    finally:
        handle.remove()
    assert torch.equal(seen[0], torch.zeros(3, 4))          # the user's hook saw the replaced value
    assert torch.equal(seen[1], net.block.lin(x).detach())  # appended: it saw the module's own output


def test_intervene_refuses_bad_edits(net):
    with pytest.raises(ConductanceError, match="not a function"):
        with sites.intervene(net, {"head": 3.0}):
            pass
    with pytest.raises(ConductanceError, match="got no sites"):
        with sites.intervene(net, {}):
            pass
    with pytest.raises(ValueError, match="no layer named 'haed'.*'head'"):
        with sites.intervene(net, {"block.lin": torch.zeros_like, "haed": torch.zeros_like}):
            pass
    assert no_hooks(net)


# --------------------------------------------------------------------------- hooks removed, messages


def test_hooks_removed_on_error_inside_the_block_and_inside_the_edit(net, data):
    x, mask = data
    with pytest.raises(KeyError, match="in the block"):
        with sites.record(net, ["block[0]", "head:input"]), sites.intervene(net, {"head": torch.zeros_like}):
            raise KeyError("in the block")
    assert no_hooks(net)

    def boom(t):
        raise RuntimeError("in the edit")

    with pytest.raises(RuntimeError, match="in the edit"):
        with sites.intervene(net, {"head:input": boom}):
            net(x, mask)
    assert no_hooks(net)
    # the blocks' keys are gone from the context too
    assert sites._ACTIVE.get() == frozenset()


def test_never_reached_and_ran_twice_messages(net, data):
    x, mask = data
    with torch.no_grad(), sites.record(net, ["head", "unused"]) as rec:
        net(x, mask)
    with pytest.raises(ConductanceError, match=r"never reached layer\(s\) \['unused'\].*choose layers"):
        rec.require()
    with torch.no_grad(), sites.intervene(net, {"unused": torch.zeros_like}) as state:
        net(x, mask)
    with pytest.raises(ConductanceError, match=r"never reached layer\(s\) \['unused'\]"):
        state.require()
    shared = Shared().eval()
    with pytest.raises(ConductanceError, match=r"'lin' ran 2 times in one forward pass .*recording needs one value"):
        with torch.no_grad(), sites.record(shared, "lin"):
            shared(torch.ones(1, 3))
    with pytest.raises(ConductanceError, match=r"'lin' ran 2 times.*an ablation needs one value"):
        with torch.no_grad(), sites.intervene(shared, {"lin": torch.zeros_like}, once=True, need="an ablation"):
            shared(torch.ones(1, 3))
    # without once=True an intervention acts at every call: both applications of lin are zeroed
    with torch.no_grad(), sites.intervene(shared, {"lin": torch.zeros_like}) as state:
        out = shared(torch.ones(1, 3))
    assert state.calls == {"lin": 2} and torch.equal(out, torch.zeros(1, 3))
    assert no_hooks(shared) and no_hooks(net)


def test_training_warning_once_per_context_and_per_thread():
    model = random_mlp().train()
    with pytest.warns(ConductanceWarning, match=r"training mode: dropout and batch-norm updates make ablation "
                                                r"results random.*model.eval\(\)"):
        sites.warn_training(model, "ablation results")
    caught_other: list = []

    def other_thread():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sites.warn_training(model)
        caught_other.extend(caught)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sites.training_warned():
            sites.warn_training(model)
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        sites.warn_training(model.eval())
    assert not caught, "silenced inside training_warned(), and no warning in eval mode"
    assert len(caught_other) == 1 and "training mode" in str(caught_other[0].message)


# --------------------------------------------------------------------------- context and threads


def test_intervention_in_one_thread_leaves_another_threads_forward_alone(net, data):
    x, mask = data
    want = manual(net, x, mask)["out"]
    inside, done = threading.Event(), threading.Event()
    in_thread = {}

    def ablating():
        with torch.no_grad(), sites.intervene(net, {"head": torch.zeros_like}):
            in_thread["out"] = net(x, mask)
            inside.set()
            done.wait(10)

    t = threading.Thread(target=ablating)
    t.start()
    assert inside.wait(10)
    try:
        with torch.no_grad():
            here = net(x, mask)                       # the hook is on the module, but not ours
    finally:
        done.set()
        t.join()
    assert torch.equal(here, want)
    assert torch.equal(in_thread["out"], torch.zeros(3, 2))
    assert no_hooks(net)


def test_a_copied_context_carries_the_intervention_into_a_thread(net, data):
    x, mask = data
    got = {}
    with torch.no_grad(), sites.intervene(net, {"head": torch.zeros_like}):
        ctx = contextvars.copy_context()
        plain = threading.Thread(target=lambda: got.__setitem__("plain", net(x, mask)))
        copied = threading.Thread(target=lambda: got.__setitem__("copied", ctx.run(net, x, mask)))
        for t in (plain, copied):
            t.start()
            t.join()
    assert torch.equal(got["copied"], torch.zeros(3, 2))
    assert torch.allclose(got["plain"], manual(net, x, mask)["out"])


def test_a_hooked_module_running_as_a_dataparallel_replica_is_refused(net, data):
    x, mask = data
    # what nn.DataParallel's replicate() makes of each module, run in a thread as parallel_apply does
    replica = net.head._replicate_for_data_parallel()
    replica.weight, replica.bias = net.head.weight.detach(), net.head.bias.detach()
    errors = []

    def run_replica():
        try:
            with torch.no_grad():
                replica(x)
        except ConductanceError as exc:
            errors.append(exc)

    with sites.intervene(net, {"head": torch.zeros_like}):
        t = threading.Thread(target=run_replica)
        t.start()
        t.join()
    assert errors and "DataParallel" in str(errors[0])


# --------------------------------------------------------------------------- the rest of the package


def test_input_site_in_layer_conductance_equals_attribute_to_layer_input():
    model = random_mlp(seed=7)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(8))
    by_suffix = cd.layer_conductance(model, x, ["2:input", "3"], n_steps=16, method="uniform")
    by_flag = cd.layer_conductance(model, x, "2", n_steps=16, method="uniform", attribute_to_layer_input=True)
    by_output = cd.layer_conductance(model, x, "1", n_steps=16, method="uniform")
    assert list(by_suffix) == ["2:input", "3"]
    torch.testing.assert_close(by_suffix["2:input"], by_flag["2"], rtol=0, atol=1e-7)
    # the input of layer 2 is the output of layer 1: the same units
    torch.testing.assert_close(by_suffix["2:input"], by_output["1"], rtol=0, atol=1e-7)
    torch.testing.assert_close(by_suffix["2:input"].sum(1), by_suffix.output_diff, rtol=1e-4, atol=1e-6)


def test_hf_path_leaves_the_users_submodule_modes_alone():
    """The embedding-path wrapper takes the model's training flag without calling train() on it."""

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.emb = nn.Embedding(10, 4)
            self.drop = nn.Dropout(0.0)       # p=0: deliberately in train mode, changes nothing
            self.lin = nn.Linear(4, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lin(self.drop(self.emb(ids))).mean(1)

    model = Toy().eval()
    model.drop.train()
    ids = torch.tensor([[1, 2, 3]])
    r = cd.hf.layer_conductance(model, ids, ["lin", "lin:input"], embedding="emb", target=0, n_steps=8,
                                pad_token_id=0)
    assert model.drop.training and not model.training and not model.lin.training
    # lin is linear after the cut at its input: conductance at its input sums to F(x) - F(x')
    assert r["lin:input"].shape == (1, 4) and r["lin"].shape == (1, 3)   # one score per neuron
    torch.testing.assert_close(r["lin:input"].sum(1), r["lin"].sum(1), rtol=1e-5, atol=1e-6)
    assert float(r["lin"].abs().sum()) > 1e-3
    assert no_hooks(model)


def test_reference_leaves_the_model_as_it_found_it():
    model = random_mlp(seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cd.reference.layer_conductance(model, torch.randn(5), "1", target=0, n_steps=4)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert no_hooks(model)


def test_only_sites_and_reference_register_hooks():
    src = pathlib.Path(cd.__file__).parent
    pattern = re.compile(r"register_forward|register_full_backward|register_module_forward|register_hook")
    offenders = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if pattern.search(p.read_text()))
    assert offenders == ["reference.py", "sites.py"]
