"""conductance.forward_args as a module: the one normaliser of forward arguments and the per-example rule,
and the modules that run a user's model with them (engine, ablation, feature selection) following it."""

from __future__ import annotations

import math
import pathlib
import re
import warnings
from collections import namedtuple

import pytest
import torch
from torch import nn

import conductance as cd
from conductance import ConductanceError, ConductanceWarning
from conductance.forward_args import ForwardArgs, Shared, ambiguous_args, take_rows, unwrap_shared

Pair = namedtuple("Pair", ["a", "b"])


def test_per_example_tensors_follow_their_rows_everything_else_passes_whole():
    batch = 3
    per = torch.arange(12.0).view(3, 4)            # (batch, 4): per example
    other = torch.ones(5, 2)                        # first dim is not the batch: whole
    scalar = torch.tensor(2.0)                      # 0-d: whole
    table = torch.randn(3, 7)                       # first dim equals the batch by coincidence
    fa = ForwardArgs.make((per, [other, {"s": scalar}], cd.shared(table), 4.5),
                          {"mask": per.long(), "pair": Pair(per, "x"), "note": None}, batch)
    rows = torch.tensor([2, 0, 0, 1, 2])            # out of order, repeated: one row per point
    args, kwargs = fa.at(rows)
    torch.testing.assert_close(args[0], per[[2, 0, 0, 1, 2]])
    assert args[1][0] is other and args[1][1]["s"] is scalar and isinstance(args[1], list)
    assert args[2] is table                         # shared(): unwrapped, not indexed
    assert args[3] == 4.5
    torch.testing.assert_close(kwargs["mask"], per.long()[[2, 0, 0, 1, 2]])
    assert type(kwargs["pair"]) is Pair and kwargs["pair"].b == "x"   # a named tuple keeps its type
    torch.testing.assert_close(kwargs["pair"].a, per[[2, 0, 0, 1, 2]])
    assert kwargs["note"] is None
    # no rows: the whole batch, nothing indexed, shared() unwrapped
    args, kwargs = fa.at()
    assert args[0] is per and args[2] is table and kwargs["mask"].shape == (3, 4)


def test_subset_keeps_shared_wrapped_and_composes_with_at():
    per = torch.arange(10.0).view(5, 2)
    table = torch.randn(5, 5)
    fa = ForwardArgs.make((per, cd.shared(table)), {"k": per * 2}, 5, warn_ambiguous=False)
    part = fa.subset(torch.tensor([4, 1, 3]))
    assert part.batch == 3 and isinstance(part.args[1], Shared) and part.args[1].value is table
    torch.testing.assert_close(part.args[0], per[[4, 1, 3]])
    # rows of the subset are rows of the original: subset(s).at(r) == at(s[r])
    args, kwargs = part.at(torch.tensor([2, 0]))
    want_args, want_kwargs = fa.at(torch.tensor([3, 4]))
    torch.testing.assert_close(args[0], want_args[0])
    torch.testing.assert_close(kwargs["k"], want_kwargs["k"])
    assert args[1] is table
    keywords = part.keywords()
    assert set(keywords) == {"additional_forward_args", "forward_kwargs"}
    assert isinstance(keywords["additional_forward_args"][1], Shared)   # handed on, the next call unwraps


def test_unwrap_shared_and_take_rows_without_rows_index_nothing():
    W = torch.randn(2, 2)
    nested = {"a": (cd.shared(W), [cd.shared(3)])}
    out = unwrap_shared(nested)
    assert out["a"][0] is W and out["a"][1] == [3]
    assert take_rows(torch.ones(2, 3), None, 2).shape == (2, 3)
    assert take_rows(cd.shared(W), torch.tensor([1]), 2, keep_shared=True).value is W


def test_the_checked_forms_and_refusals():
    assert ForwardArgs.make(None, None, 2).at() == ((), {})
    one = torch.ones(2)
    assert ForwardArgs.make(one, None, 2).args == (one,)          # one value: one positional argument
    with pytest.raises(ConductanceError, match=r"got a list: .*additional_forward_args=\(your_list,\)"):
        ForwardArgs.make([1, 2], None, 2)
    with pytest.raises(ConductanceError, match="got a dict: pass keyword arguments as forward_kwargs="):
        ForwardArgs.make({"a": 1}, None, 2)
    with pytest.raises(ConductanceError, match="forward_kwargs must be a dict.*got tuple"):
        ForwardArgs.make(None, (1,), 2)


def test_ambiguity_warnings_name_the_tensor_and_shared():
    batch = 4
    square = torch.randn(batch, batch)
    param = nn.Parameter(torch.randn(batch, 3))
    with pytest.warns(ConductanceWarning, match=r"additional_forward_args\[0\] of shape \(4, 4\), "
                                                r"forward_kwargs\['w'\] of shape \(4, 3\): the first dimension "
                                                r"equals the batch size \(4\).*conductance.shared"):
        ForwardArgs.make((square,), {"w": param}, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConductanceWarning)
        ForwardArgs.make((cd.shared(square), torch.ones(batch, batch, dtype=torch.long)), {"w": cd.shared(param)},
                         batch)                                  # shared, or integer (token ids, masks): no doubt
        ForwardArgs.make((torch.randn(1, 1),), None, 1)          # one example: a (1, 1) matrix is not doubtful
        ForwardArgs.make((square,), None, batch, warn_ambiguous=False)
    assert ambiguous_args([torch.randn(2, 2), (torch.randn(2, 5).requires_grad_(),)], 2, "x") == \
        ["x[0] of shape (2, 2)", "x[1][0] of shape (2, 5)"]


# ---- every module follows the rule -------------------------------------------------------------------

class Mixer(nn.Module):
    """hidden = tanh(x @ W) * scale, scores = head(hidden); W (4, 5) has the batch size as first dimension."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.hidden = nn.Identity()
        self.head = nn.Linear(5, 3)

    def forward(self, x, W, scale):
        return self.head(self.hidden(torch.tanh(x @ W) * scale))


@pytest.fixture
def mixer():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, generator=g) * 2
    W = torch.randn(4, 5, generator=g)
    scale = torch.rand(4, 5, generator=g) + 0.5      # per example
    return Mixer().eval(), x, W, scale


def test_feature_selection_activations_slice_per_example_arguments_across_batches(mixer):
    from conductance.selection import layer_activations
    model, x, W, scale = mixer
    got = layer_activations(model, x, "hidden", units="neuron", batch_size=3,
                            additional_forward_args=(cd.shared(W), scale))
    torch.testing.assert_close(got, torch.tanh(x @ W) * scale)      # rows 0-2 and row 3 with their own scale


def test_ablation_passes_shared_whole_and_per_example_rows_to_every_forward(mixer):
    """flip_count with a shared() weight and a per-example scale equals a naive loop that calls the model
    on one example at a time with its own row (the unablated forward used to receive the wrapper itself)."""
    model, x, W, scale = mixer
    order = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    naive = []
    with torch.no_grad():
        for b in range(4):
            label = model(x[b:b + 1], W, scale[b:b + 1]).argmax(1)
            count = math.inf
            for k in range(1, 6):
                with cd.ablate(model, "hidden", order[b, :k].tolist()):
                    if model(x[b:b + 1], W, scale[b:b + 1]).argmax(1) != label:
                        count = k
                        break
            naive.append(count)
    assert any(math.isfinite(c) for c in naive)
    for expand in (False, True):
        got = cd.flip_count(model, x, "hidden", order, additional_forward_args=(cd.shared(W),),
                            forward_kwargs={"scale": scale}, expand_at_layer=expand)
        assert got.tolist() == naive, expand
    torch.testing.assert_close(cd.layer_values(model, x, "hidden", additional_forward_args=(cd.shared(W), scale)),
                               torch.tanh(x @ W) * scale)


def test_layer_conductance_gives_each_example_its_row(mixer):
    model, x, W, scale = mixer
    together = cd.layer_conductance(model, x, "hidden", additional_forward_args=(cd.shared(W), scale), n_steps=8,
                                    target=1)
    for i in (0, 3):
        alone = cd.layer_conductance(model, x[i:i + 1], "hidden", additional_forward_args=(W, scale[i:i + 1]),
                                     n_steps=8, target=1)
        torch.testing.assert_close(together["hidden"][i], alone["hidden"][0])


# ---- no other module reimplements it ---------------------------------------------------------------

#: The forms the copies took before they were replaced: an ad-hoc default of the keyword arguments,
#: wrapping one positional argument into a tuple, the row rule as a conditional expression, and the
#: helpers' names.
_COPIES = re.compile(r"forward_kwargs\)? or \{\}"
                     r"|else \(\w+,\)"
                     r"|shape\[0\] == [a-z_.]+ else"
                     r"|def (_index_args|_as_args|_as_tuple|unwrap_shared|ambiguous_args|check_forward_args"
                     r"|take_rows)\b")


def test_only_forward_args_normalises_forward_arguments():
    src = pathlib.Path(cd.__file__).parent
    offenders = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if _COPIES.search(p.read_text()))
    assert offenders == ["forward_args.py"]
