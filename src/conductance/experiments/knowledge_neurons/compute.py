"""The knowledge-neurons study's measurements: perplexity, prompts, conductance and the Knowledge-Neurons
integrated gradients of MLP neurons and heads, the interventions and the per-unit errors against references.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional, cast

import numpy as np
import torch
from torch import nn

from ... import hf, sites
from ...progress import Progress
from .config import ACTIONS, BOS, HEAD_RANKS, KN_STEPS, PAD, RANKS, REFERENCE_POINTS
from .model import Vocabulary


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


def interventions(model: nn.Module, prompts: list[dict], cfg: dict[str, Any], seed: int,
                  progress: Optional[bool] = None) -> tuple[dict, list[dict[str, Any]], list[float]]:
    """Attribute every prompt, then suppress, baseline and amplify its top-k neurons and heads of each ranking.

    Parameters
    ----------
    model : nn.Module
        The GPT-2 language model.
    prompts : list of dict
        :func:`select_prompts`'s result.
    cfg : dict
        ``ks``, ``head_ks`` and ``random_draws`` of :data:`SETTINGS`.
    seed : int
        The random units are drawn with ``seed + 14``.
    progress : bool, optional

    Returns
    -------
    (change, attributions, p0)
        ``change[(kind, action)][ranking][k]``: the relative changes (p' - p) / p of the target
        probability, one per prompt; :func:`attribute_prompt`'s result per prompt; the unchanged probabilities.
    """
    # (kind, action) -> ranking -> k -> relative changes of the target probability, one per prompt
    change: dict[tuple[str, str], dict[str, dict[int, list[float]]]]
    change = {(kind, a): {r: {k: [] for k in (cfg["ks"] if kind == "neuron" else cfg["head_ks"])}
                          for r in (RANKS if kind == "neuron" else HEAD_RANKS)}
              for kind in ("neuron", "head") for a in ACTIONS}
    rng = np.random.RandomState(seed + 14)
    attributions = []
    probs = []
    bar = Progress(progress, len(prompts), "knowledge neurons: attribution and interventions", "prompts")
    for pr in prompts:
        att = attribute_prompt(model, pr)
        attributions.append(att)
        ids = torch.tensor([pr["ids"]])
        p0 = target_prob(model, ids, pr["target"])
        probs.append(p0)
        # the baseline input: [BOS] at every position (cd.hf's "auto" baseline; positions stay real)
        base_ids = torch.full_like(ids, BOS)
        set_to = {("neuron", "suppress"): None, ("head", "suppress"): None,
                  ("neuron", "amplify"): {b: 2 * v for b, v in mlp_inputs(model, ids).items()},
                  ("head", "amplify"): {b: 2 * v for b, v in hf.head_inputs(model, ids).items()},
                  ("neuron", "baseline"): mlp_inputs(model, base_ids),
                  ("head", "baseline"): hf.head_inputs(model, base_ids)}
        n_blocks, n_neurons = att["conductance"]["neurons"].shape
        n_heads = att["conductance"]["heads"].shape[1]
        for kind, ks, rlist, shape in (("neuron", cfg["ks"], RANKS, (n_blocks, n_neurons)),
                                       ("head", cfg["head_ks"], HEAD_RANKS, (n_blocks, n_heads))):
            field = "neurons" if kind == "neuron" else "heads"
            for k in ks:
                draws = [[(int(b), int(u)) for b, u in (np.unravel_index(i, shape) for i in
                                                        rng.choice(shape[0] * shape[1], size=k, replace=False))]
                         for _ in range(cfg["random_draws"])]
                for action in ACTIONS:
                    values = set_to[(kind, action)]
                    for r in rlist:
                        if r == "random":
                            ps = [intervene(model, ids, pr["target"], d, kind, values) for d in draws]
                            rel = float(np.mean([(p - p0) / p0 for p in ps]))
                        else:
                            units = top_units(att[r][field], k)
                            rel = (intervene(model, ids, pr["target"], units, kind, values) - p0) / p0
                        change[(kind, action)][r][k].append(rel)
        bar.update(1)
    bar.close()
    return change, attributions, probs


def unit_errors(model: nn.Module, prompts: list[dict], attributions: list[dict[str, Any]],
                n_error: int) -> tuple[dict[str, list], dict[str, list]]:
    """Per-unit error of conductance (and of its own estimate) and of kn_ig against converged references.

    Parameters
    ----------
    model : nn.Module
    prompts : list of dict
    attributions : list of dict
        :func:`attribute_prompt`'s result per prompt.
    n_error : int
        How many of the first prompts get references.

    Returns
    -------
    (errs, costs)
        ``errs``: per prompt, one error per MLP layer, for ``conductance``, ``conductance_estimate`` and
        ``kn_ig``; ``costs``: per prompt, points and seconds of both methods and of the reference.
    """
    from ...engine import unit_error

    errs: dict[str, list] = {"conductance": [], "conductance_estimate": [], "kn_ig": []}
    costs: dict[str, list] = {"conductance_points": [], "conductance_seconds": [], "kn_points": [],
                              "kn_seconds": [], "reference_seconds": []}
    for j, pr in enumerate(prompts[:n_error]):
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
    return errs, costs
