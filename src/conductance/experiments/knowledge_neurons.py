"""Which MLP neurons and heads of a small trained GPT-2 carry a next-token prediction (Knowledge-Neurons protocol).

A GPT-2-architecture language model (transformers' ``GPT2LMHeadModel`` from a ``GPT2Config``) is
trained here on the Rotten Tomatoes review snippets with a word-level vocabulary built from the
training split, and cached in ``$CONDUCTANCE_CACHE``. For held-out prompts whose next word the
model predicts correctly (top-1), the units pushing the probability of that word up are ranked by

- conductance at our default accuracy (adaptive rule, tolerance 0.02), all layers in one path;
- gradient x activation;
- the 20-step integrated gradients of Knowledge Neurons (Dai et al. 2022): one layer at a time,
  the layer's MLP activations at the predicting position scaled from 0 to their value, right
  Riemann sum of the gradient of the target probability (see :func:`kn_integrated_gradients`);
- random units (seeded draws);

then the top-k units are suppressed (zeroed) or amplified (doubled) and the relative change of the
target probability is measured, as Dai et al. do. A last section compares the per-unit error and
the cost of conductance at the default accuracy with those of the 20-step rule, both measured
against converged references (512-point Gauss-Legendre) of their own integrals.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional, cast

import numpy as np
import torch
from torch import nn

from .. import hf, sites
from ..progress import Progress
from . import cache_dir
from .report import Report

#: Version of the vocabulary, model code and training recipe; part of every cache key.
CACHE_VERSION = "kn-gpt2-1"
SPECIALS = ("[PAD]", "[UNK]", "[BOS]")
PAD, UNK, BOS = 0, 1, 2
KN_STEPS = 20
REFERENCE_POINTS = 512

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")

SETTINGS = {
    # quick: about half a minute on one idle core from an empty cache
    True: dict(model=dict(n_layer=2, n_embd=64, n_head=4, n_inner=256, n_positions=32, vocab_size=1500,
                          n_train=4000, epochs=2, batch=32, lr=3e-3),
               n_prompts=8, ks=(1, 5, 10), head_ks=(1, 2), random_draws=3, n_error=2),
    False: dict(model=dict(n_layer=4, n_embd=128, n_head=4, n_inner=512, n_positions=48, vocab_size=3000,
                           n_train=0, epochs=3, batch=32, lr=2e-3),
                n_prompts=40, ks=(1, 5, 10, 20), head_ks=(1, 2, 4), random_draws=5, n_error=6),
}


# ----------------------------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------------------------

def tokenize(text: str) -> list[str]:
    """Lower-cased words (with clitics such as "it's" kept whole) and single punctuation marks.

    Parameters
    ----------
    text : str

    Returns
    -------
    list of str
    """
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Word-level vocabulary: [PAD], [UNK], [BOS], then the most frequent training words."""

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        if tuple(self.words[:3]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}, got {self.words[:3]}")
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Sequence[str], size: int) -> Vocabulary:
        """The special tokens, then the ``size - len(SPECIALS)`` most frequent words (ties alphabetical).

        Parameters
        ----------
        texts : sequence of str
        size : int
            Number of entries, specials included.

        Returns
        -------
        Vocabulary
        """
        counts = collections.Counter(w for t in texts for w in tokenize(t))
        # ties broken alphabetically so the vocabulary does not depend on dict order
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size - len(SPECIALS)]
        return cls(list(SPECIALS) + [w for w, _ in ranked])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """[BOS] followed by the ids of the words of ``text``.

        Parameters
        ----------
        text : str

        Returns
        -------
        list of int
        """
        return [BOS] + [self.index.get(w, UNK) for w in tokenize(text)]


# ----------------------------------------------------------------------------------------------
# the model: training and cache
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LMConfig:
    """Everything that determines the trained weights (the cache key is made from it)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_inner: int
    n_positions: int
    vocab_size: int
    n_train: int          # training snippets used (0: all of the training split)
    epochs: int
    batch: int
    lr: float
    seed: int = 0

    def key(self, data_fingerprint: str) -> str:
        """File-name-safe key: the cache version plus a hash of the settings and the training data.

        Parameters
        ----------
        data_fingerprint : str

        Returns
        -------
        str
        """
        blob = json.dumps({"version": CACHE_VERSION, "data": data_fingerprint, **asdict(self)}, sort_keys=True)
        return f"{CACHE_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def build_model(config: LMConfig, vocab_size: int) -> nn.Module:
    """An untrained GPT2LMHeadModel of ``config``'s shape; [BOS] doubles as eos (no pad token, as GPT-2).

    Parameters
    ----------
    config : LMConfig
    vocab_size : int

    Returns
    -------
    nn.Module
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ImportError("the knowledge_neurons experiment needs `pip install transformers`") from exc
    hf_logging.set_verbosity_error()
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                     n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner,
                     bos_token_id=BOS, eos_token_id=BOS, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(cfg)


def _windows(ids: list[list[int]], length: int) -> torch.Tensor:
    """The snippets' ids (each starting with [BOS]) concatenated and cut into windows of ``length``."""
    stream = [t for row in ids for t in row]
    n = len(stream) // length
    return torch.tensor(stream[:n * length], dtype=torch.long).view(n, length)


def train(config: LMConfig, texts: Sequence[str], log: Callable[[str], None] = print,
          progress: Optional[bool] = None) -> tuple[nn.Module, Vocabulary, dict]:
    """Train the LM on ``texts`` (next-token loss, AdamW, linear warm-up then cosine decay); seeded.

    Parameters
    ----------
    config : LMConfig
    texts : sequence of str
    log : callable str -> None
    progress : bool, optional
        A bar counting the training batches of all epochs on stderr (None: when stderr is a terminal).

    Returns
    -------
    model : nn.Module
    vocab : Vocabulary
    info : dict
    """
    torch.manual_seed(config.seed)
    vocab = Vocabulary.build(texts, config.vocab_size)
    model = build_model(config, len(vocab))
    data = _windows([vocab.encode(t) for t in texts], config.n_positions)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    steps = config.epochs * ((len(data) + config.batch - 1) // config.batch)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    model.train()
    losses = []
    bar = Progress(progress, steps, "training the language model", "batches")
    for epoch in range(config.epochs):
        order = torch.randperm(len(data), generator=gen)
        total, count = 0.0, 0
        for s in range(0, len(data), config.batch):
            batch = data[order[s:s + config.batch]]
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
            bar.update(1)
        losses.append(total / count)
        log(f"[knowledge_neurons] epoch {epoch + 1}/{config.epochs}: train loss {losses[-1]:.3f}")
    bar.close()
    model.eval()
    info = {"train_seconds": round(time.perf_counter() - start, 1), "train_loss": losses,
            "train_tokens": int(data.numel()), "parameters": int(sum(p.numel() for p in model.parameters()))}
    return model, vocab, info


def _weights_digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def training_texts(config: LMConfig) -> list[str]:
    """The training snippets used: all of the training split, or the first ``n_train`` of a seeded permutation.

    Parameters
    ----------
    config : LMConfig

    Returns
    -------
    list of str
    """
    from ..datasets import load_rotten_tomatoes

    texts, _ = load_rotten_tomatoes("train")
    if config.n_train:
        order = np.random.RandomState(config.seed).permutation(len(texts))[:config.n_train]
        texts = [texts[i] for i in order]
    return list(texts)


def cache_path(config: LMConfig, texts: Sequence[str]) -> str:
    """Where the LM of ``config`` trained on ``texts`` is cached.

    Parameters
    ----------
    config : LMConfig
    texts : sequence of str

    Returns
    -------
    str
    """
    fingerprint = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"{config.key(fingerprint)}.pt")


def load_or_train(config: LMConfig, log: Callable[[str], None] = print, progress: Optional[bool] = None
                  ) -> tuple[nn.Module, Vocabulary, dict]:
    """The trained LM (eval mode, parameters frozen), its vocabulary and facts about its training.

    Cached under ``$CONDUCTANCE_CACHE`` in a file named after the configuration and the training
    text; the file's weights are checked against the digest saved with them, and a file that
    fails the check (or does not load) is retrained and replaced.

    Parameters
    ----------
    config : LMConfig
    log : callable str -> None
    progress : bool, optional
        A bar over the training batches when it trains (see :func:`train`).

    Returns
    -------
    model : nn.Module
    vocab : Vocabulary
    info : dict
    """
    texts = training_texts(config)
    path = cache_path(config, texts)
    model: Optional[nn.Module] = None
    vocab: Optional[Vocabulary] = None
    info: dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("version") != CACHE_VERSION or _weights_digest(saved["state"]) != saved["digest"]:
                raise ValueError("weights do not match their saved digest")
            vocab = Vocabulary(saved["words"])
            model = build_model(config, len(vocab))
            model.load_state_dict(saved["state"])
            info = {**json.loads(saved["info"]), "cached": True}
        except Exception as exc:  # noqa: BLE001 - any unreadable cache file is rebuilt, and said so
            log(f"[knowledge_neurons] cached model {path} unusable ({exc}); retraining")
            model = None
    if model is None:
        model, vocab, info = train(config, texts, log, progress=progress)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tmp = path + ".tmp"
        torch.save({"version": CACHE_VERSION, "state": state, "digest": _weights_digest(state),
                    "words": vocab.words, "info": json.dumps(info)}, tmp)
        os.replace(tmp, path)
        info = {**info, "cached": False}
    assert vocab is not None  # loaded or trained together with the model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, vocab, {**info, "path": path}


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------

def perplexities(model: nn.Module, vocab: Vocabulary, train_texts: Sequence[str], texts: Sequence[str]
                 ) -> dict[str, float]:
    """Per-token perplexity of the LM and of an add-one unigram model on ``texts`` (each snippet alone,
    every token after [BOS] predicted; [UNK] is one of the predicted classes for both models).

    Parameters
    ----------
    model : nn.Module
    vocab : Vocabulary
    train_texts : sequence of str
        For the unigram counts.
    texts : sequence of str

    Returns
    -------
    dict str -> float
    """
    counts = np.ones(len(vocab))
    for t in train_texts:
        for i in vocab.encode(t)[1:]:
            counts[i] += 1
    counts[[PAD, BOS]] = 0
    with np.errstate(divide="ignore"):    # [PAD] and [BOS] are never predicted
        logp_uni = np.log(counts / counts.sum())
    nll_lm, nll_uni, n = 0.0, 0.0, 0
    limit = cast(Any, model.config).n_positions  # a transformers config
    with torch.no_grad():
        for t in texts:
            ids = vocab.encode(t)[:limit]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            lp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
            nxt = torch.tensor(ids[1:])
            nll_lm -= float(lp[torch.arange(len(nxt)), nxt].sum())
            nll_uni -= float(logp_uni[ids[1:]].sum())
            n += len(nxt)
    return {"lm": float(np.exp(nll_lm / n)), "unigram": float(np.exp(nll_uni / n)), "tokens": n}


def select_prompts(model: nn.Module, vocab: Vocabulary, texts: Sequence[str], n: int, min_context: int = 4
                   ) -> list[dict]:
    """Up to ``n`` prompts: each snippet cut before its first word (alphabetic, 3+ letters, in the
    vocabulary) that is the model's top word (its most probable token other than [UNK], [PAD] and
    [BOS]) after at least ``min_context`` words of context.

    Parameters
    ----------
    model : nn.Module
    vocab : Vocabulary
    texts : sequence of str
    n : int
    min_context : int

    Returns
    -------
    list of dict
        One prompt each.
    """
    prompts = []
    limit = cast(Any, model.config).n_positions  # a transformers config
    with torch.no_grad():
        for t in texts:
            ids = vocab.encode(t)[:limit]
            if len(ids) <= min_context + 1:
                continue
            probs = torch.softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            # the top word: [UNK] (a fifth of the tokens) and the other specials are not words
            best = probs[:, BOS + 1:].argmax(-1) + BOS + 1
            for p in range(min_context, len(ids) - 1):
                tok = ids[p + 1]
                word = vocab.words[tok]
                if tok > BOS and word.isalpha() and len(word) >= 3 and int(best[p]) == tok:
                    prompts.append({"text": t, "ids": ids[:p + 1], "target": tok, "word": word,
                                    "prompt": " ".join(vocab.words[i] for i in ids[1:p + 1]),
                                    "prob": float(probs[p, tok])})
                    break
            if len(prompts) >= n:
                break
    return prompts


def target_prob(model: nn.Module, ids: torch.Tensor, token: int) -> float:
    """Probability of ``token`` after the last position of ``ids`` (1, tokens).

    Parameters
    ----------
    model : nn.Module
    ids : LongTensor, shape (1, tokens)
    token : int

    Returns
    -------
    float
    """
    with torch.no_grad():
        return float(torch.softmax(model(ids).logits[0, -1].double(), -1)[token])


# ----------------------------------------------------------------------------------------------
# the Knowledge-Neurons integrated gradients
# ----------------------------------------------------------------------------------------------

def _rule(rule: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [0, 1]: "right" (right Riemann sum k/n, weight 1/n) or "gausslegendre"."""
    if rule == "right":
        return torch.arange(1, n + 1, dtype=torch.float64) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    raise ValueError(f"unknown rule {rule!r}")


def kn_integrated_gradients(model: nn.Module, ids: torch.Tensor, token: int, block: int, *, n_steps: int = KN_STEPS,
                            rule: str = "right", chunk: int = 128) -> tuple[torch.Tensor, float]:
    """Knowledge-Neurons attribution of one block's MLP neurons (Dai et al. 2022, their eq. 3-4).

    The block's MLP activations ``w`` (the input of its down projection) at the last position are
    replaced by ``alpha * w`` while every other position and layer runs as usual; the attribution
    is ``w * integral_0^1 dP(alpha w)/dw dalpha``, with ``P`` the probability of ``token`` after the
    last position. ``rule="right"`` with 20 steps is the paper's Riemann sum
    (``alpha = k/m``, k = 1..m). All neurons of the layer are scaled together, one layer per run.

    Returns the attributions (neurons,) and ``P(w) - P(0)`` (their sum as the rule converges).

    Parameters
    ----------
    model : nn.Module
    ids : LongTensor, shape (1, tokens)
    token : int
    block : int
    n_steps : int
    rule : str
    chunk : int
        Path points per forward pass.

    Returns
    -------
    attributions : Tensor, shape (neurons,)
    change : float
    """
    name = hf.family(model).mlp[block]
    with sites.record(model, name, at_input=True) as rec, torch.no_grad():
        model(ids)
    rec.require()
    w = rec.values[name][0, -1].detach()
    alphas, weights = _rule(rule, n_steps)
    total = torch.zeros_like(w, dtype=torch.float64)
    scaled: dict[str, torch.Tensor] = {}

    def replace(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :-1], scaled["a"].unsqueeze(1).to(x.dtype)], 1)

    with sites.intervene(model, {name: replace}, at_input=True):
        for s in range(0, n_steps, chunk):
            a = alphas[s:s + chunk]
            scaled["a"] = (a.to(w.dtype).unsqueeze(1) * w).requires_grad_(True)
            with torch.enable_grad():
                out = model(ids.expand(len(a), -1)).logits[:, -1]
                prob = torch.softmax(out.double(), -1)[:, token]
                grad, = torch.autograd.grad(prob.sum(), scaled["a"])
            total += (weights[s:s + chunk].unsqueeze(1) * grad.double()).sum(0)
        with torch.no_grad():
            scaled["a"] = torch.zeros(1, w.shape[0], dtype=w.dtype)
            p0 = float(torch.softmax(model(ids).logits[0, -1].double(), -1)[token])
    return w.double() * total, target_prob(model, ids, token) - p0


# ----------------------------------------------------------------------------------------------
# attribution and interventions
# ----------------------------------------------------------------------------------------------

def attribute_prompt(model: nn.Module, prompt: dict, **path: Any) -> dict[str, Any]:
    """Conductance and gradient x activation of every MLP neuron and head for one prompt (one path run),
    plus the Knowledge-Neurons 20-step integrated gradients of every MLP layer (one run per layer).

    Parameters
    ----------
    model : nn.Module
    prompt : dict
        As from :func:`select_prompts`.
    **path
        Rule keywords for the conductance run.

    Returns
    -------
    dict str -> Any
    """
    ids = torch.tensor([prompt["ids"]])
    mlp = hf.layers(model, "mlp")
    att = hf.layers(model, "attention")
    target = hf.next_token("prob", token=prompt["target"])
    t0 = time.perf_counter()
    # a list of measures: one TransformerResult per measure
    res = cast(dict[str, hf.TransformerResult],
               hf.layer_importance(model, ids, {**mlp, **att}, measure=["conductance", "grad_x_activation"],
                                   target=target, **path))
    seconds = time.perf_counter() - t0
    cond = res["conductance"]
    out: dict[str, Any] = {"mlp_layers": list(mlp), "head_layers": list(att), "conductance_seconds": seconds,
                           "conductance_points": int(cond.raw.n_points.max()), "baseline": cond.baseline,
                           "target": cond.target, "result": cond,
                           "unit_error": {n: float(cond.unit_error[n][0]) for n in list(mlp) + list(att)}}
    for m in ("conductance", "grad_x_activation"):
        r = res[m]
        out[m] = {"neurons": torch.stack([r[n][0] for n in mlp]).double().numpy(),
                  "heads": torch.stack([r[n][0] for n in att]).double().numpy()}
    t0 = time.perf_counter()
    kn = [kn_integrated_gradients(model, ids, prompt["target"], b)[0] for b in range(len(mlp))]
    out["kn_seconds"] = time.perf_counter() - t0
    out["kn_points"] = KN_STEPS * len(mlp)
    out["kn_ig"] = {"neurons": torch.stack(kn).numpy()}
    return out


def top_units(scores: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(block, unit) of the ``k`` largest scores of (blocks, units): the units raising the target most.

    Parameters
    ----------
    scores : ndarray, shape (blocks, units)
    k : int

    Returns
    -------
    list of (int, int)
    """
    flat = np.argsort(-scores, axis=None, kind="stable")[:k]
    pairs = (np.unravel_index(i, scores.shape) for i in flat)
    return [(int(block), int(unit)) for block, unit in pairs]


def mlp_inputs(model: nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each block's MLP down-projection input (1, tokens, neurons) at ``ids``.

    Parameters
    ----------
    model : nn.Module
    ids : LongTensor, shape (1, tokens)

    Returns
    -------
    dict int -> Tensor, shape (1, tokens, neurons)
    """
    return hf.head_inputs(model, ids, module=hf.family(model).mlp[0].replace(".0.", ".{i}.", 1))


def intervene(model: nn.Module, ids: torch.Tensor, token: int, units: list[tuple[int, int]], kind: str,
              values: Optional[dict] = None) -> float:
    """Target probability with ``units`` (neurons or heads) zeroed at every position, or set to
    ``values`` (block -> (1, tokens, width): e.g. twice their activations to amplify them, or their
    values at the baseline input).

    Parameters
    ----------
    model : nn.Module
    ids : LongTensor, shape (1, tokens)
    token : int
    units : list of (int, int)
        (block, unit) pairs.
    kind : str
        ``"neuron"`` (MLP neurons) or ``"head"`` (attention heads).
    values : dict int -> Tensor, optional

    Returns
    -------
    float
    """
    ablate = hf.ablate_neurons if kind == "neuron" else hf.ablate_heads
    with ablate(model, units, values=values):
        return target_prob(model, ids, token)


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------

def _median_change(changes: dict) -> dict:
    return {r: {k: float(np.median(v)) for k, v in per.items()} for r, per in changes.items()}


def run(report: Report, *, quick: bool, weights: Optional[str] = None, seed: int = 0,
        settings: Optional[dict] = None, progress: Optional[bool] = None) -> None:
    """Add the knowledge-neurons sections to ``report`` (``weights`` is unused: the LM is trained here).

    ``settings`` overrides entries of :data:`SETTINGS` (tests use a smaller configuration).

    Parameters
    ----------
    report : Report
    quick : bool
    weights : str, optional
    seed : int
    settings : dict, optional
    progress : bool, optional
        tqdm bars on stderr for the training batches and the prompts studied (None: when stderr is a terminal).
    """
    from ..datasets import load_rotten_tomatoes

    cfg = {**SETTINGS[bool(quick)], **(settings or {})}
    t_start = time.perf_counter()
    config = LMConfig(**cfg["model"], seed=seed)
    model, vocab, info = load_or_train(config, progress=progress)
    test_texts, _ = load_rotten_tomatoes("test")
    ppl = perplexities(model, vocab, training_texts(config), test_texts)
    sec = report.section("Knowledge neurons: the language model", key="kn-model")
    sec.text(f"A GPT-2-architecture decoder (transformers GPT2LMHeadModel, {config.n_layer} blocks, width "
             f"{config.n_embd}, {config.n_head} heads, MLP {config.n_inner}, context {config.n_positions}, "
             f"{info['parameters']:,} parameters) trained {config.epochs} epoch(s) with AdamW (lr {config.lr}, "
             f"batch {config.batch} windows) on {info['train_tokens']:,} tokens of Rotten Tomatoes training "
             "snippets (each preceded by [BOS], concatenated and cut into context-sized windows), next-token loss, "
             f"seed {seed}. Vocabulary: [PAD], [UNK], [BOS] and the {len(vocab) - 3} most frequent training "
             "words (lower-cased words and punctuation marks); [BOS] doubles as the end-of-text token and there "
             "is no pad token, as in GPT-2, so cd.hf's baseline=\"auto\" is the [BOS] embedding at every "
             "position. Perplexity per token on the held-out test snippets (each snippet alone, every token "
             "after [BOS]):")
    sec.table([["GPT-2 LM", ppl["lm"]], ["unigram (add-one, training counts)", ppl["unigram"]]],
              ["model", "test perplexity"], caption=f"{ppl['tokens']:,} test tokens")
    sec.numbers(perplexity=ppl, train=info, config=asdict(config), vocabulary=len(vocab))

    prompts = select_prompts(model, vocab, test_texts, cfg["n_prompts"])
    if not prompts:
        raise RuntimeError("no test snippet has a word the model predicts top-1; the model did not learn")
    ranks = ("conductance", "grad_x_activation", "kn_ig", "random")
    head_ranks = ("conductance", "grad_x_activation", "random")
    actions = ("suppress", "baseline", "amplify")
    # (kind, action) -> ranking -> k -> relative changes of the target probability, one per prompt
    change: dict[tuple[str, str], dict[str, dict[int, list[float]]]]
    change = {(kind, a): {r: {k: [] for k in (cfg["ks"] if kind == "neuron" else cfg["head_ks"])}
                          for r in (ranks if kind == "neuron" else head_ranks)}
              for kind in ("neuron", "head") for a in actions}
    rng = np.random.RandomState(seed + 14)
    attributions = []
    rows = []
    bar = Progress(progress, len(prompts), "knowledge neurons: attribution and interventions", "prompts")
    for pr in prompts:
        att = attribute_prompt(model, pr)
        attributions.append(att)
        ids = torch.tensor([pr["ids"]])
        p0 = target_prob(model, ids, pr["target"])
        # the baseline input: [BOS] at every position (cd.hf's "auto" baseline; positions stay real)
        base_ids = torch.full_like(ids, BOS)
        set_to = {("neuron", "suppress"): None, ("head", "suppress"): None,
                  ("neuron", "amplify"): {b: 2 * v for b, v in mlp_inputs(model, ids).items()},
                  ("head", "amplify"): {b: 2 * v for b, v in hf.head_inputs(model, ids).items()},
                  ("neuron", "baseline"): mlp_inputs(model, base_ids),
                  ("head", "baseline"): hf.head_inputs(model, base_ids)}
        n_blocks, n_neurons = att["conductance"]["neurons"].shape
        n_heads = att["conductance"]["heads"].shape[1]
        for kind, ks, rlist, shape in (("neuron", cfg["ks"], ranks, (n_blocks, n_neurons)),
                                       ("head", cfg["head_ks"], head_ranks, (n_blocks, n_heads))):
            field = "neurons" if kind == "neuron" else "heads"
            for k in ks:
                draws = [[(int(b), int(u)) for b, u in (np.unravel_index(i, shape) for i in
                                                        rng.choice(shape[0] * shape[1], size=k, replace=False))]
                         for _ in range(cfg["random_draws"])]
                for action in actions:
                    values = set_to[(kind, action)]
                    for r in rlist:
                        if r == "random":
                            ps = [intervene(model, ids, pr["target"], d, kind, values) for d in draws]
                            rel = float(np.mean([(p - p0) / p0 for p in ps]))
                        else:
                            units = top_units(att[r][field], k)
                            rel = (intervene(model, ids, pr["target"], units, kind, values) - p0) / p0
                        change[(kind, action)][r][k].append(rel)
        top = top_units(att["conductance"]["neurons"], 3)
        rows.append([pr["prompt"][-60:], pr["word"], p0, ", ".join(f"L{b}.N{i}" for b, i in top),
                     ", ".join(f"L{b}.N{i}" for b, i in top_units(att["kn_ig"]["neurons"], 3)),
                     att["conductance_points"]])
        bar.update(1)
    bar.close()

    sec = report.section("Knowledge neurons: suppressing and amplifying the top units", key="kn-interventions")
    sec.text(f"{len(prompts)} held-out test snippets, each cut before the first word (alphabetic, 3+ letters, "
             "after at least 4 words) that the model predicts top-1. Target: the probability of that word "
             "after the prompt (cd.hf.next_token(\"prob\", token=...)). Per prompt, the units with the largest "
             "values are those pushing the probability up; they are suppressed (zeroed at every position, "
             "cd.hf.ablate_neurons / cd.hf.ablate_heads, as Dai et al.), set to their values at the baseline "
             "input ([BOS] at every position: the reference conductance measures against; 'baseline'), or "
             "amplified (doubled at every position, values= twice their activations, as Dai et al.), and the "
             "relative change (p' - p) / p of the target probability is taken; the "
             f"tables show its median over the prompts. Rankings: conductance (adaptive rule at the default "
             f"tolerance 0.02, baseline {attributions[0]['baseline']!r}, the neuron summed over positions); "
             "gradient x activation (summed over positions); kn_ig: the Knowledge-Neurons 20-step integrated "
             "gradients of the MLP activations at the last position, scaled from 0 (one run per layer); random: "
             f"mean of {cfg['random_draws']} seeded draws per prompt.")
    medians = {f"{kind}-{a}": _median_change(change[(kind, a)]) for kind, a in change}
    for kind, a in change:
        ks = cfg["ks"] if kind == "neuron" else cfg["head_ks"]
        m = medians[f"{kind}-{a}"]
        sec.table([[r] + [m[r][k] for k in ks] for r in m], ["ranking"] + [f"k={k}" for k in ks],
                  caption=f"{a} the top-k MLP {kind}s of {len(attributions[0]['mlp_layers'])} layers: median "
                          f"relative change of the target probability" if kind == "neuron" else
                  f"{a} the top-k heads: median relative change of the target probability")
    sec.table(rows, ["prompt (end)", "next word", "p", "top conductance neurons", "top kn_ig neurons", "points"],
              caption="Prompts and their top neurons")
    try:
        from .. import plots
        for kind in ("neuron", "head"):
            ks = list(cfg["ks"] if kind == "neuron" else cfg["head_ks"])
            series = {f"{r} {a}": ([0] + ks, [0.0] + [medians[f"{kind}-{a}"][r][k] for k in ks])
                      for a in actions for r in medians[f"{kind}-{a}"]}
            # one colour per ranking, one line style per intervention
            colours = {"conductance": "C0", "grad_x_activation": "C1", "kn_ig": "C2", "random": "C7"}
            styles = {name: {"linestyle": "--" if name.endswith("amplify") else ":" if name.endswith("baseline")
                             else "-", "color": colours[name.rsplit(" ", 1)[0]]} for name in series}
            fig = plots.curves(series, xlabel=f"top {kind}s changed", ylabel="median relative change of p",
                               styles=styles, markers=True,
                               title=f"{kind}s: suppress (solid), baseline (dotted), amplify (dashed)")
            sec.figure(fig, f"Median relative change of the target probability after suppressing, baselining or "
                            f"amplifying the top-k {kind}s", name=f"kn-{kind}s")
    except ImportError:
        pass
    sec.numbers(median_relative_change=medians,
                per_prompt={f"{kind}-{a}": change[(kind, a)] for kind, a in change},
                prompts=[{k: v for k, v in p.items() if k != "ids"} for p in prompts])

    # --- accuracy and cost ---
    sec = report.section("Knowledge neurons: per-unit error and cost", key="kn-accuracy")
    err_rows = []
    errs: dict[str, list] = {"conductance": [], "conductance_estimate": [], "kn_ig": []}
    costs: dict[str, list] = {"conductance_points": [], "conductance_seconds": [], "kn_points": [],
                              "kn_seconds": [], "reference_seconds": []}
    from ..engine import unit_error
    for j, pr in enumerate(prompts[:cfg["n_error"]]):
        att = attributions[j]
        ids = torch.tensor([pr["ids"]])
        mlp = att["mlp_layers"]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = hf.layer_conductance(model, ids, mlp, target=hf.next_token("prob", token=pr["target"]),
                                       method="gausslegendre", n_steps=REFERENCE_POINTS)
        costs["reference_seconds"].append(time.perf_counter() - t0)
        ref_neurons = torch.stack([ref[n][0] for n in mlp])
        got = torch.as_tensor(att["conductance"]["neurons"])
        # the same relative L2 (floored at a share of |F(x) - F(x')|) as result.unit_error, per layer
        c_err = [float(unit_error(got[b:b + 1], ref_neurons[b:b + 1], ref.output_diff)[0]) for b in range(len(mlp))]
        k_err = []
        for b in range(len(mlp)):
            kn_ref, kn_diff = kn_integrated_gradients(model, ids, pr["target"], b, n_steps=REFERENCE_POINTS,
                                                      rule="gausslegendre")
            k_err.append(float(unit_error(torch.as_tensor(att["kn_ig"]["neurons"][b:b + 1]), kn_ref[None],
                                          torch.tensor([kn_diff]))[0]))
        est = [att["unit_error"][n] for n in mlp]
        errs["conductance"].append(c_err)
        errs["conductance_estimate"].append(est)
        errs["kn_ig"].append(k_err)
        for key in ("conductance_points", "conductance_seconds", "kn_points", "kn_seconds"):
            costs[key].append(att[key])
        err_rows.append([pr["word"], att["conductance_points"], max(c_err), max(est), att["kn_points"], max(k_err),
                         att["conductance_seconds"], att["kn_seconds"]])
    sec.text(f"For {len(err_rows)} prompts: the per-unit error of each MLP layer's neuron vector (relative L2 "
             "distance to a converged reference, floored at 1% of |F(x) - F(x')| as result.unit_error is; the "
             "table shows the worst layer). Conductance at the default accuracy (the adaptive rule, tolerance "
             "0.02: all MLP layers and heads from one path) is measured against conductance with "
             f"{REFERENCE_POINTS}-point Gauss-Legendre, and its own estimate (result.unit_error) is shown beside "
             f"it; the Knowledge-Neurons {KN_STEPS}-step right Riemann sum against the same integral with "
             f"{REFERENCE_POINTS}-point Gauss-Legendre (its F(x) - F(x') is P(w) - P(0)). Points: forward and "
             "backward passes on the path (conductance: one path for every layer; kn_ig: 20 per layer). The "
             "two are different integrals (conductance: input-embedding path, all positions; kn_ig: one "
             "layer's activations at one position), so only their accuracy and cost compare.")
    sec.table(err_rows, ["next word", "conductance points", "conductance error", "conductance estimate",
                         "kn_ig points", "kn_ig error", "conductance seconds", "kn_ig seconds"])
    summary = {k: {"median": float(np.median(np.max(v, 1))), "max": float(np.max(v))} for k, v in errs.items()}
    sec.text(f"Median over prompts of the worst layer's error: conductance {summary['conductance']['median']:.4f} "
             f"(estimate {summary['conductance_estimate']['median']:.4f}), kn_ig {summary['kn_ig']['median']:.4f}.")
    sec.numbers(error=errs, error_summary=summary,
                cost={k: {"median": float(np.median(v)), "values": v} for k, v in costs.items()},
                total_seconds=round(time.perf_counter() - t_start, 1))
