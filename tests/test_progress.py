"""progress= on layer conductance and importance: a bar counting the path points really evaluated."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import conductance as cd
from conductance import ConductanceError
from models import random_mlp


def _last_count(err: str) -> tuple[int, int]:
    counts = re.findall(r"(\d+)/(\d+)", err)
    assert counts, err
    done, total = counts[-1]
    return int(done), int(total)


def test_fixed_rule_bar_counts_every_point(capsys):
    model = random_mlp(seed=1, act=nn.ReLU)
    x = torch.randn(3, 5)
    r = cd.layer_conductance(model, x, "1", n_steps=9, method="uniform", progress=True)
    err = capsys.readouterr().err
    assert "conductance of 1" in err and "points" in err
    assert _last_count(err) == (3 * 10, 3 * 10)
    assert r.extra["model_evaluations"] >= 30


def test_adaptive_bar_stops_where_the_rule_does(capsys):
    model = random_mlp(seed=2, act=nn.ReLU)
    x = torch.randn(2, 5) * 3
    r = cd.layer_importance(model, x, ["1", "3"], tolerance=0.01, max_steps=200, progress=True)
    done, total = _last_count(capsys.readouterr().err)
    assert total == 2 * 200
    assert done == int(r.n_points.sum())   # every point once, no more


def test_no_bar_by_default_and_bad_values_refused_before_the_model_runs(capsys):
    model = random_mlp(seed=3)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        cd.layer_conductance(model, torch.randn(2, 5), "1", n_steps=4)
        assert "points" not in capsys.readouterr().err
        calls.clear()
        with pytest.raises(ConductanceError, match="progress must be True, False or None"):
            cd.layer_conductance(model, torch.randn(2, 5), "1", n_steps=4, progress="yes")
        assert calls == []
    finally:
        handle.remove()


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


def test_curve_bar_counts_its_rows(capsys):
    model, x = _classifier(), torch.randn(3, 6)
    scores = torch.randn(3, 12)
    curve = cd.deletion_curve(model, x, "1", scores, ks=[0, 2, 4, 8], random_seeds=2, progress=True)
    err = capsys.readouterr().err
    assert "deletion curve of 1" in err
    # (the ranking and 2 random ones) x 3 examples x 4 values of k
    assert _last_count(err) == (3 * 3 * 4, 3 * 3 * 4)
    assert curve.logit.shape == (3, 4)


def test_flip_count_bar_counts_rows_without_a_total(capsys):
    model, x = _classifier(), torch.randn(4, 6)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        counts = cd.flip_count(model, x, "1", torch.randn(4, 12), expand_at_layer=False, progress=True)
    finally:
        handle.remove()
    err = capsys.readouterr().err
    assert "flip counts of 1" in err
    rows = [int(n) for n in re.findall(r": (\d+) rows \[", err)]
    # every ablated row the model ran, after the one unablated forward of the batch
    assert seen[0] == 4 and rows[-1] == sum(seen[1:]) > 0
    assert counts.shape == (4,)
    with pytest.raises(ConductanceError, match="progress must be True, False or None"):
        cd.flip_count(model, x, "1", torch.randn(4, 12), progress=1)
