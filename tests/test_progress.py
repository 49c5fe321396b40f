"""progress= on layer conductance and importance: a bar counting the path points really evaluated."""

from __future__ import annotations

import re
from typing import Optional

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


def test_aggregate_bar_counts_every_example_once_and_refuses_a_bad_value_before_the_model_runs(capsys):
    from torch.utils.data import DataLoader, TensorDataset

    model = _classifier()
    data = DataLoader(TensorDataset(torch.randn(13, 6), torch.randint(0, 4, (13,))), batch_size=5)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ConductanceError, match="progress must be True, False or None"):
            cd.aggregate(model, data, "1", n_steps=4, progress="yes")
        assert calls == []
    finally:
        handle.remove()
    result = cd.aggregate(model, data, "1", n_steps=4, progress=True)
    bars = _bars(capsys.readouterr().err, "conductance")
    assert bars == [(13, 13)] and result.n_examples == 13      # whole examples, no "13.0/13.0"


# ----------------------------------------------------------------------------------------------
# `conductance reproduce`: the long loops of the experiments, through the same Progress bars


def _bars(err: str, desc: str) -> list[tuple[int, Optional[int]]]:
    """(done, total) of the last refresh of every bar called ``desc`` (total None for a bare count):
    tqdm draws a new bar at 0 and redraws it in place (after a carriage return) as it grows."""
    bars: list[tuple[int, Optional[int]]] = []
    for line in re.split(r"[\r\n]", err):
        m = re.match(re.escape(desc) + r":\s+(?:\d+%\|.*?\| )?(\d+)(?:/(\d+))?[ a-z]", line.strip())
        if m:
            done, total = int(m.group(1)), None if m.group(2) is None else int(m.group(2))
            if done == 0 or not bars:
                bars.append((done, total))
            else:
                bars[-1] = (done, total)
    return bars


@pytest.mark.skipif(not __import__("conductance.datasets", fromlist=["x"]).fashion_mnist_available(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_training_bar_counts_every_batch_of_every_epoch(capsys):
    from conductance.experiments import fashion_inception as fi

    config = fi.TrainConfig(n_train=200, epochs=2, batch_size=64, n_test=100, bn_images=200, seed=0)
    _, history = fi.train(config, progress=True)
    bars = _bars(capsys.readouterr().err, "training the Fashion-MNIST Inception")
    assert len(history) == 2
    assert bars == [(2 * 4, 2 * 4)]          # ceil(200 / 64) = 4 batches per epoch
    fi.train(config, progress=False)
    assert capsys.readouterr().err == ""


def test_text_training_and_attribution_bars_count_batches_and_texts(capsys):
    from conductance.datasets import load_rotten_tomatoes
    from conductance.experiments import text as tx
    from conductance.experiments.text import network as tc

    texts, labels = load_rotten_tomatoes("train")
    config = tc.TrainConfig(epochs=2, train_limit=230, n_filters=8, seed=0)
    model, info = tc.train(texts, labels, config, progress=True)
    err = capsys.readouterr().err
    per_epoch = -(-230 // config.batch_size)
    assert _bars(err, "training the sentiment CNN") == [(2 * per_epoch, 2 * per_epoch)]
    assert info["train_examples"] == 230
    run = tx.filter_conductance(model, texts[:37], batch_size=16, n_steps=8, progress=True)
    err = capsys.readouterr().err
    assert _bars(err, "conductance of the filters") == [(37, 37)]
    assert "points" not in err                     # the inner layer_conductance calls draw no bar of their own
    assert run["values"].shape == (37, config.n_filters)
    tx.filter_conductance(model, texts[:5], n_steps=8, target=tx.sentiment_score, progress=False)
    assert capsys.readouterr().err == ""


def test_photo_analysis_bars_count_points_photos_and_ablated_rows(capsys):
    from conductance.experiments import image
    from conductance.experiments.image.compute import _random_seeds

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    x = torch.rand(3, 3, 12, 12)
    a = image.analyse_photos(model, x, ["a", "b", "c"], ["1", "3"], "3", top_filters=2,
                             measures=("conductance", "activation"), rule={"n_steps": 6, "method": "uniform"},
                             pixel_rule={"n_steps": 4, "method": "uniform"}, baselines=0.0, max_units=3,
                             progress=True)
    err = capsys.readouterr().err
    # activation is not a path measure: the bar counts conductance's points, 3 photos x 7
    assert _bars(err, "conductance of 1, 3") == [(3 * 7, 3 * 7)]
    assert _bars(err, "per-pixel maps of 3") == [(3, 3)]
    # compare_rankings: one bar per block and mode, counting every ablated row the model ran
    counted = _bars(err, "rankings compared of 1") + _bars(err, "rankings compared of 3")
    assert len(counted) == 2 * 2 and all(total is None for _, total in counted)
    # the same rows as the library's own count for that work (checked against real forwards above)
    cd.compare_rankings(model, x, "3", {m: a.importance[m] for m in ("conductance", "activation")},
                        units="channel", random_seeds=_random_seeds(1, 0), max_units=3, progress=True)
    assert _bars(capsys.readouterr().err, "rankings compared of 3")[0] == counted[2] and counted[2][0] > 0
    assert a.pixel.shape[:2] == (3, 2)
    image.analyse_photos(model, x, ["a", "b", "c"], ["1", "3"], "3", top_filters=2,
                         measures=("conductance", "activation"), rule={"n_steps": 2, "method": "uniform"},
                         pixel_rule={"n_steps": 2, "method": "uniform"}, baselines=0.0, max_units=2, progress=False)
    assert capsys.readouterr().err == ""


def test_minilm_feature_bar_counts_the_snippets(capsys):
    from conductance.experiments import transformer as tf

    try:
        encoder, tokenizer = tf.load_minilm()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"MiniLM not available: {exc}")
    texts = ["a quietly moving film", "not good at all", "dull", "the best thing this year, by far",
             "it is not bad", "a mess"]
    feats = tf.encode(encoder, tokenizer, texts, batch=4, progress=True)
    assert _bars(capsys.readouterr().err, "MiniLM features") == [(6, 6)]
    assert feats.shape == (6, 384) and bool(feats.abs().sum(1).gt(0).all())


@pytest.mark.slow
def test_reproduce_progress_option_shows_the_experiment_bars_and_no_flag_in_a_pipe_shows_none(tmp_path, monkeypatch,
                                                                                              capsys):
    from conductance.cli import main
    from conductance.datasets import load_rotten_tomatoes
    from conductance.experiments import text as tx
    from conductance.experiments.text import network as tc

    monkeypatch.setenv("CONDUCTANCE_CACHE", str(tmp_path / "cache"))     # trains: the training bar shows too
    assert main(["reproduce", "text", "--quick", "--progress", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    n_train = len(load_rotten_tomatoes("train")[0])
    batches = tx.QUICK["epochs"] * -(-n_train // tc.TrainConfig().batch_size)
    assert _bars(err, "training the sentiment CNN") == [(batches, batches)]
    n = tx.QUICK["heat_examples"]
    assert _bars(err, "conductance of the filters") == [(n, n)]          # the predicted logit
    assert _bars(err, "conductance of the filters (score)") == [(n, n)]  # the sentiment score
    # without the option and with stderr not a terminal (here: captured), no bar at all
    assert main(["reproduce", "text", "--quick", "--out", str(tmp_path / "b")]) == 0
    assert "%|" not in capsys.readouterr().err
    from conductance.cli import build_parser
    assert [build_parser().parse_args(["reproduce", "text", "--out", "o"] + flag).progress
            for flag in ([], ["--progress"], ["--no-progress"])] == [None, True, False]


def test_language_model_training_bar_counts_every_batch(capsys):
    pytest.importorskip("transformers")
    from conductance.experiments import knowledge_neurons as kn
    from conductance.experiments.knowledge_neurons.model import _windows

    config = kn.LMConfig(n_layer=1, n_embd=16, n_head=2, n_inner=32, n_positions=16, vocab_size=200, n_train=60,
                         epochs=2, batch=8, lr=3e-3)
    texts = kn.training_texts(config)
    windows = _windows([kn.Vocabulary.build(texts, config.vocab_size).encode(t) for t in texts],
                          config.n_positions)
    kn.train(config, texts, log=lambda line: None, progress=True)
    per_epoch = -(-windows.shape[0] // config.batch)
    err = capsys.readouterr().err
    assert per_epoch > 1 and _bars(err, "training the language model") == [(2 * per_epoch,) * 2]


def test_hf_layer_conductance_bar_counts_every_point_and_none_by_default(capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, n_inner=32, vocab_size=50, n_positions=16, bos_token_id=1,
        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    ids = torch.randint(3, 50, (2, 6))
    layers = cd.hf.layers(model, "mlp")
    quiet = cd.hf.layer_conductance(model, ids, layers, target=(5, 7), n_steps=4, method="uniform")
    assert capsys.readouterr().err == ""
    shown = cd.hf.layer_conductance(model, ids, layers, target=(5, 7), n_steps=4, method="uniform", progress=True)
    # 5 uniform points per example, two examples, counted as they are evaluated
    assert _last_count(capsys.readouterr().err) == (2 * 5, 2 * 5)
    for name in layers:
        assert torch.equal(quiet[name], shown[name])


@pytest.mark.skipif(not __import__("conductance.datasets", fromlist=["x"]).fashion_mnist_available(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_pruning_study_bar_counts_every_pruned_network(capsys):
    pytest.importorskip("torch_pruning")
    from conductance.experiments import pruning
    from conductance.experiments.fashion_inception import FashionInception

    torch.manual_seed(0)
    model = FashionInception().eval()
    settings = dict(ratios=[0.3], n_cal=64, n_test=64, n_ft=64, seeds=2, n_steps=2)
    res = pruning.study_network("inception", model, settings, lambda _: None, progress=True)
    runs = sum(len(rows["pruned"]) for rows in res["criteria"].values())
    assert runs == len(pruning.CRITERIA) - 1 + 2          # random drawn twice, every other criterion once
    # per run: each ratio, then the global 50% network
    assert _bars(capsys.readouterr().err, "pruning the inception") == [(runs * 2, runs * 2)]
