"""The knowledge-neurons study's language model: tokeniser, vocabulary, a small GPT-2 trained on the
Rotten Tomatoes snippets, and its cache.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ...progress import Progress
from .. import cache_dir
from .config import BOS, CACHE_VERSION, SPECIALS, UNK

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


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
    from ...datasets import load_rotten_tomatoes

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
