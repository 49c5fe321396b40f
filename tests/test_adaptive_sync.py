"""The adaptive rule reads numbers back to the host once per refinement round, not once per interval.

On CUDA every ``.item()``, ``float(t)``, ``.tolist()`` or ``.cpu()`` of a device tensor waits for the
device; the rule's scores and residuals of each refined interval stay on the device until the
round's single read-back. The CPU stands in for the device here: the calls that would synchronise
are counted while the rule runs (those of the point evaluator itself, one set per chunk of points,
excluded), against the rounds and the intervals refined.
"""

import torch
from torch import nn

import conductance as cd
from conductance import adaptive, engine
from models import random_mlp

SYNCS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__")


def _counted_run(monkeypatch, x):
    counts = {"syncs": 0, "rounds": 0, "pairs": 0}
    state = {"in_rule": False, "in_evaluate": False}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if state["in_rule"] and not state["in_evaluate"]:
                counts["syncs"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    evaluate, run, refine = engine.evaluate, adaptive.AdaptiveIntegrator.run, adaptive.AdaptiveIntegrator.refine

    def in_evaluate(*args, **kwargs):
        state["in_evaluate"] = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            state["in_evaluate"] = False

    def in_rule(self):
        state["in_rule"] = True
        try:
            return run(self)
        finally:
            state["in_rule"] = False

    def counted_refine(self, proposals):
        counts["rounds"] += 1
        counts["pairs"] += sum(len(p) for p in proposals.values())
        return refine(self, proposals)

    monkeypatch.setattr(engine, "evaluate", in_evaluate)
    monkeypatch.setattr(adaptive.AdaptiveIntegrator, "run", in_rule)
    monkeypatch.setattr(adaptive.AdaptiveIntegrator, "refine", counted_refine)
    model = random_mlp(seed=6, act=nn.ReLU).eval()
    result = cd.layer_conductance(model, x, ["1", "3"], target=0, tolerance=1e-4, max_steps=200)
    monkeypatch.undo()
    return result, counts


def test_host_reads_per_round_do_not_grow_with_the_refined_intervals(monkeypatch):
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(3)) * 3
    one, few = _counted_run(monkeypatch, x[:1])
    many, lots = _counted_run(monkeypatch, x)
    # the second run refines many more intervals per round (eight examples' pairs together) ...
    assert lots["pairs"] >= 4 * lots["rounds"] and lots["pairs"] > 2 * few["pairs"]
    assert (many.relative_error["3"] < 1e-4 * 1.01).all()
    # ... yet reads back the same few times per round: the evaluator's F of each chunk and one
    # read-back of the round's scores, residuals and norms (plus the starting grid's)
    for counts in (few, lots):
        assert counts["syncs"] <= 2 * (counts["rounds"] + 1), counts
    # the values are those of the rule: the per-example run and the batched run agree on example 0
    torch.testing.assert_close(one["1"][0], many["1"][0], rtol=1e-4, atol=1e-6)
