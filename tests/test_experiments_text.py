"""Text experiments: tokeniser, vocabulary, the sentiment CNN's padding, conductance identities, training
on the real Rotten Tomatoes snippets with GloVe, the sign statistic and the negation detector."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import conductance as cd
from conductance.errors import ConductanceError
from conductance.experiments import text as tx
from conductance.experiments.text import network as tc
from conductance.experiments.text import tokens as tk


def _tiny_model(seed=0, dim=8, n_filters=12, vocab_words=("this", "is", "not", "good", "bad", "film")):
    """A random (untrained) SentimentCNN with a fixed, seeded embedding table."""
    torch.manual_seed(seed)
    vocab = tk.Vocabulary(list(vocab_words))
    net = tc.TextCNN(dim=dim, n_filters=n_filters, widths=(2, 3, 4))
    # larger biases than the default init so that some filters sit above zero at the baseline
    with torch.no_grad():
        for conv in net.filters.convs:
            conv.bias.uniform_(-0.3, 0.3)
    vectors = torch.randn(len(vocab), dim)
    return tc.SentimentCNN(vocab, net, vectors).eval()


# ----------------------------------------------------------------------------------------------
# tokeniser, vocabulary, negation words


def test_tokenize_lowercases_and_splits_contractions_like_glove():
    assert tk.tokenize("It isn't GOOD.") == ["it", "is", "n't", "good", "."]
    assert tk.tokenize("I can't, won't; it's") == ["i", "ca", "n't", ",", "wo", "n't", ";", "it", "'s"]
    assert tk.tokenize("A sci-fi 1990s U.S. thriller!") == ["a", "sci-fi", "1990s", "u.s", ".", "thriller", "!"]
    assert tk.tokenize("'quoted'") == ["'", "quoted", "'"]
    assert tk.tokenize("don\u2019t") == ["do", "n't"]  # typographic apostrophe
    assert tk.tokenize("Büttner's película") == ["büttner", "'s", "película"]  # accented letters stay in words
    assert tk.tokenize("") == []
    with pytest.raises(ConductanceError, match="str"):
        tk.tokenize(["a", "list"])


def test_vocabulary_keeps_known_words_once_and_unknown_words_twice():
    tokens = [["good", "film", "zzq"], ["good", "yyq", "yyq"], ["bad"]]
    vocab = tk.Vocabulary.build(tokens, known={"good", "film", "bad"})
    # most frequent first, ties alphabetical; "zzq" (unknown to GloVe, seen once) is dropped
    assert vocab.words == ["<pad>", "good", "yyq", "bad", "film"]
    assert vocab.encode(["good", "zzq", "film", "never-seen"]) == [1, 0, 4, 0]
    assert "good" in vocab and "zzq" not in vocab and "<pad>" not in vocab
    assert len(vocab) == 5
    with pytest.raises(ConductanceError, match="unique"):
        tk.Vocabulary(["a", "a"])


def test_negation_detector():
    assert tk.has_negation("This isn't a good film")
    assert tk.has_negation("Nothing works.")
    assert tk.has_negation("I cannot recommend it")
    assert tk.has_negation("neither funny nor moving")
    assert tk.has_negation(["no", "way"])
    assert not tk.has_negation("A notable film, knotty and nonstop")  # words that merely contain "no"/"not"
    assert not tk.has_negation("")
    assert tk.negation_tokens(tk.tokenize("Not bad, never dull, won't bore")) == ["not", "never", "n't"]
    assert tx.negation_share(["not good", "good", "never", "fine"]) == 0.5
    assert math.isnan(tx.negation_share([]))


# ----------------------------------------------------------------------------------------------
# padding and conductance identities


def test_padding_is_inert_logits_and_conductance_do_not_depend_on_padding():
    model = _tiny_model()
    texts = ["this is not good", "bad film", "good"]
    x, tokens = model.embed(texts)
    assert x.shape == (3, 4, 8)
    # padding rows (and unknown words) are the zero vector: identical to the baseline
    assert torch.all(x[1, 2:] == 0) and torch.all(x[2, 1:] == 0)
    x_long, _ = model.embed(texts, min_length=15)
    assert x_long.shape == (3, 15, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), model.network(x_long), rtol=0, atol=1e-6)
    short = cd.layer_conductance(model.network, x, "filters", n_steps=32)
    long = cd.layer_conductance(model.network, x_long, "filters", n_steps=32)
    torch.testing.assert_close(short["filters"], long["filters"], rtol=0, atol=1e-6)
    # through the padding tokens themselves, every filter's conductance is exactly zero
    per_token, _, _ = tx.token_conductance(model, texts, list(range(12)), n_steps=16)
    assert per_token.shape == (12, 3, 4)
    assert np.all(per_token[:, 1, 2:] == 0) and np.all(per_token[:, 2, 1:] == 0)
    assert np.abs(per_token[:, 0]).max() > 1e-3  # ...while real tokens do carry conductance


def test_filter_features_never_fall_below_their_baseline_value():
    model = _tiny_model(seed=3)
    x, _ = model.embed(["this is not good", "film", "bad bad bad good"])
    with torch.no_grad():
        h = model.network.filters(x)
        h0 = model.network.filters(torch.zeros_like(x))
    bias = torch.cat([torch.relu(c.bias) for c in model.network.filters.convs])
    torch.testing.assert_close(h0, bias.expand_as(h0))
    assert torch.all(h >= h0 - 1e-7)


def test_per_token_conductance_sums_to_the_filters_layer_conductance():
    model = _tiny_model(seed=1)
    texts = ["this is not good film", "bad", "good good not bad"]
    x, _ = model.embed(texts)
    layer = cd.layer_conductance(model.network, x, "filters", n_steps=64)["filters"].numpy()  # (3, 12)
    per_token, _, _ = tx.token_conductance(model, texts, list(range(12)), n_steps=128)
    sums = per_token.sum(-1).T  # (3, 12)
    scale = np.abs(layer).max()
    assert scale > 0.05
    np.testing.assert_allclose(sums, layer, atol=5e-3 * scale)
    # and the layer is a cut: its conductances sum to F(x) - F(x')
    with torch.no_grad():
        out = model.network(x)
        base = model.network(torch.zeros_like(x))
    pred = out.argmax(1)
    diff = (out.gather(1, pred[:, None]) - base.gather(1, pred[:, None])).squeeze(1).numpy()
    np.testing.assert_allclose(layer.sum(1), diff, atol=1e-5)


def test_filter_conductance_batches_and_targets():
    model = _tiny_model(seed=2)
    texts = ["this is not good", "bad film", "good", "not bad at all", "film film"]
    whole = tx.filter_conductance(model, texts, batch_size=16)
    batched = tx.filter_conductance(model, texts, batch_size=2)  # different padding per batch
    np.testing.assert_allclose(whole["values"], batched["values"], atol=1e-6)
    assert whole["values"].shape == (5, 12) and whole["relative_error"].max() < 1e-3
    # linearity (paper's T7): fresh - rotten = cond(fresh) - cond(rotten)
    score = tx.filter_conductance(model, texts, target=tx.sentiment_score)["values"]
    fresh = tx.filter_conductance(model, texts, target=lambda o: o[:, 1])["values"]
    rotten = tx.filter_conductance(model, texts, target=lambda o: o[:, 0])["values"]
    np.testing.assert_allclose(score, fresh - rotten, atol=1e-5)
    # after the cut comes a linear layer: cond = (w_fresh - w_rotten) * (h(x) - h(x'))
    x, _ = model.embed(texts)
    with torch.no_grad():
        dh = (model.network.filters(x) - model.network.filters(torch.zeros_like(x))).numpy()
    w = model.network.fc.weight.detach().numpy()
    np.testing.assert_allclose(score, dh * (w[1] - w[0]), atol=1e-5)


def test_filter_ngrams_name_the_max_pool_window():
    torch.manual_seed(0)
    vocab = tk.Vocabulary(["a", "b", "c", "d"])
    net = tc.TextCNN(dim=4, n_filters=2, widths=(2,))
    vectors = torch.zeros(5, 4)
    vectors[1:] = torch.eye(4)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        conv = net.filters.convs[0]  # weight (filters, dim, width)
        conv.weight[0, 1, 0] = 1.0  # filter 0: "b" followed by "c" (ids 2, 3 = unit vectors 1, 2)
        conv.weight[0, 2, 1] = 1.0
        conv.weight[1, 3, 0] = 1.0  # filter 1: "d" followed by anything
    model = tc.SentimentCNN(vocab, net, vectors).eval()
    grams = tx.filter_ngrams(model, ["a b c a", "a a", "d"])
    assert grams[0][0] == "b c"
    assert grams[1][0] == ""  # nothing fires: the winning window is pure padding
    assert grams[2][1] == "d"  # a window half in the right padding keeps only the real token


# ----------------------------------------------------------------------------------------------
# sign statistic


def test_sign_statistic_on_a_hand_made_matrix():
    n = 20
    cols = [
        np.full(n, 0.5),  # all positive: single-signed (+)
        np.r_[np.full(19, -0.2), 0.3],  # 19 of 20 negative = 95%: single-signed (-)
        np.r_[np.full(18, 0.2), -0.3, -0.3],  # 90%: not single-signed
        np.zeros(n),  # never non-zero: not active
        np.r_[np.full(10, 0.009), np.full(10, -0.009)],  # all below the threshold: not active
        np.r_[np.full(5, 0.4), np.full(15, 0.001)],  # 5 positives, the rest count as zero: single-signed (+)
        np.r_[np.full(10, 1.0), np.full(10, -1.0)],  # half and half
    ]
    stat = tx.sign_statistic(np.stack(cols, 1), threshold=0.01, purity=0.95)
    assert stat["n_units"] == 7 and stat["n_active"] == 5 and stat["n_single_signed"] == 3
    assert stat["share_single_signed"] == pytest.approx(3 / 5)
    assert stat["n_positive_units"] == 2 and stat["n_negative_units"] == 1
    assert stat["single_signed"].tolist() == [True, True, False, False, False, True, False]
    np.testing.assert_allclose(stat["majority_share"][[0, 1, 2, 5, 6]], [1, 0.95, 0.9, 1, 0.5])
    assert np.isnan(stat["majority_share"][3]) and np.isnan(stat["majority_share"][4])
    assert stat["positive"].tolist() == [20, 1, 18, 0, 0, 5, 10]
    assert stat["nonzero_share"] == pytest.approx((20 + 20 + 20 + 5 + 20) / 140)
    # a stricter purity drops the 95% column; a looser one admits the 90% column
    assert tx.sign_statistic(np.stack(cols, 1), purity=1.0)["n_single_signed"] == 2
    assert tx.sign_statistic(np.stack(cols, 1), purity=0.9)["n_single_signed"] == 4
    with pytest.raises(ConductanceError, match="matrix"):
        tx.sign_statistic(np.zeros(5))
    with pytest.raises(ConductanceError, match="purity"):
        tx.sign_statistic(np.zeros((2, 2)), purity=0.4)


def test_network_rejects_token_ids():
    model = _tiny_model()
    with pytest.raises(ConductanceError, match="embed"):
        model.network(torch.zeros(2, 5))
    with pytest.raises(ConductanceError, match="list of texts"):
        model.embed("one text")


# ----------------------------------------------------------------------------------------------
# training on the real data (Rotten Tomatoes snippets + GloVe 50d)


def test_training_a_small_model_on_real_reviews_beats_chance():
    from conductance.datasets import load_rotten_tomatoes

    texts, labels = load_rotten_tomatoes("train")
    test_texts, test_labels = load_rotten_tomatoes("test")
    config = tc.TrainConfig(epochs=2, train_limit=4000, n_filters=32, lr=3e-3, seed=0)
    model, info = tc.train(texts, labels, config)
    assert info["train_examples"] == 4000 and info["glove_words"] > 0.9 * (info["vocab_size"] - 1)
    acc = tc.accuracy(model, test_texts, test_labels)
    majority = max(test_labels.mean(), 1 - test_labels.mean())  # 0.548
    assert acc > majority + 0.1, (acc, majority)  # measured 0.727
    assert info["epoch_loss"][1] < info["epoch_loss"][0] < math.log(2) + 0.05


def test_cache_round_trip_and_deterministic_training(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDUCTANCE_CACHE", str(tmp_path))
    config = tc.TrainConfig(epochs=1, train_limit=300, n_filters=16, seed=5)
    model, info = tc.load_or_train(config)
    assert not info["cached"] and info["path"].startswith(str(tmp_path)) and config.key() in info["path"]
    again, info2 = tc.load_or_train(config)
    assert info2["cached"]
    texts = ["this is not good", "a quietly moving film"]
    torch.testing.assert_close(model.predict(texts), again.predict(texts), rtol=0, atol=0)
    # retraining from scratch with the same seed gives the same weights
    from conductance.datasets import load_rotten_tomatoes

    fresh, _ = tc.train(*load_rotten_tomatoes("train"), config)
    torch.testing.assert_close(fresh.predict(texts), model.predict(texts), rtol=0, atol=0)
    assert tc.TrainConfig(epochs=2, seed=5).key() != tc.TrainConfig(epochs=1, seed=5).key()


# ----------------------------------------------------------------------------------------------
# the whole experiment


@pytest.mark.slow
def test_run_quick_writes_every_section_and_number(tmp_path, monkeypatch):
    from conductance.experiments.report import Report

    monkeypatch.setenv("CONDUCTANCE_CACHE", str(tmp_path / "cache"))  # trains from an empty cache
    report = Report("text", {})
    tx.run(report, quick=True, weights=None, seed=0)
    keys = [s.key for s in report.sections]
    assert keys == ["text-model", "text-signs", "text-negation", "text-completeness", "text-settings"]
    d = report.data
    assert d["text-model"]["cached"] is False
    assert 0.62 < d["text-model"]["test_accuracy"] < 0.9
    signs = d["text-signs"]
    assert signs["n_examples"] == tx.QUICK["heat_examples"]
    assert 0 < signs["predicted_logit"]["n_single_signed"] <= signs["predicted_logit"]["n_active"] <= 256
    # for a fixed linear output the sign is fixed by the dense weights (h(x) >= h(x'))
    assert signs["sentiment_score"]["share_single_signed"] == 1.0
    assert signs["score_sign_matches_weight"] == 1.0 and signs["predicted_sign_matches_weight"] == 1.0
    neg = d["text-negation"]
    assert set(neg["sentences"]) == set(tx.NEGATION_SENTENCES) | set(tx.CONTROL_SENTENCES)
    assert 0.15 < neg["base_rate_all_test"] < 0.35
    assert 0 <= neg["chosen_negation_share"] <= 1 and len(neg["chosen_filters"]) >= tx.QUICK["top_filters"]
    comp = d["text-completeness"]
    assert comp["predicted_max_relative_error"] < 0.01 and comp["sentiment_max_relative_error"] < 0.01
    assert comp["token_sum_max_abs_error"] < 0.01
    assert len([f for f in report.files if f.startswith("text-")]) == 4
    out_html, out_json = report.write(str(tmp_path / "out"))
    assert "Text: negation" in Path(out_html).read_text()
