"""Settings of the text experiments: the sentences studied, thresholds, quick and full sizes, the paper's setup."""

from __future__ import annotations

from typing import Any

#: The two sentences of the paper's negation study, and controls without the negation.
NEGATION_SENTENCES = ("this is not good", "this is not bad")


CONTROL_SENTENCES = ("this is good", "this is bad")


#: |conductance| below this counts as zero (the paper's threshold).
THRESHOLD = 0.01


#: A filter is "single-signed" when at least this share of its non-zero conductances share one sign.
PURITY = 0.95


#: Fixed rule for conductance through the embeddings (the per-token maps). The max-pooled layer's
#: own conductance is exact from a handful of points (the layer feeds a linear map), so the
#: adaptive rule would stop there; through the inputs the integrand has ReLU and argmax kinks and
#: needs a fine grid: 64 Gauss-Legendre intervals keep the per-token sums within ~0.5% of the layer value.
TOKEN_STEPS = 64


QUICK: dict[str, Any] = {"epochs": 1, "heat_examples": 300, "top_reviews": 10, "top_filters": 4, "heat_rows": 300}


FULL: dict[str, Any] = {"epochs": 5, "heat_examples": None, "top_reviews": 20, "top_filters": 5, "heat_rows": 600}


PAPER = {
    "network": "convolutional sentiment network, 256 filters (Kim 2014 style per our reading)",
    "data": "about 4,000 Stanford Sentiment Treebank examples",
    "sign_claim": "almost every filter carries only positive or only negative sentiment",
    "negation_claim": "filters with high conductance for 'this is not good' / 'this is not bad' are largely "
                      "about negation",
}
