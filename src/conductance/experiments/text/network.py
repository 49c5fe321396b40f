"""The paper-style sentiment CNN: Kim (2014) network, training and cache (tokens: :mod:`.tokens`).

The word-embedding lookup stays OUTSIDE the attributed network: :class:`TextCNN` takes embeddings
(batch, tokens, dim), so the integration path runs in embedding space from the all-zero baseline,
as in "How Important Is a Neuron?". :class:`SentimentCNN` pairs the network with its vocabulary
and (fine-tuned) embedding table and turns texts into embedding batches.

Padding is exactly inert: the padding embedding is the zero vector, every convolution pads its
input with ``width`` zero vectors on both sides, so each filter always sees at least one window of
pure padding. The max over time of a filter is therefore at least its value on the all-zero input
(``relu(bias)``), and more padding tokens only add windows of that same value: the logits, and every
attribution, do not depend on how far a batch is padded.

Trained weights and the vocabulary are cached in ``$CONDUCTANCE_CACHE`` (default
``~/.cache/conductance``) in a file named after the training configuration; they are retrained
(seeded, deterministic on the CPU) when the file is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional, cast

import numpy as np
import torch
from torch import nn

from ...errors import ConductanceError
from ...progress import Progress
from .. import cache_dir  # noqa: F401  (shared cache folder; re-exported)
from .tokens import Vocabulary, tokenize

#: Version of the model code and training recipe; part of every cache key.
CACHE_VERSION = "textcnn-v2"


class FilterBank(nn.Module):
    """Kim-style convolutions of several widths, ReLU, and max over time.

    Input (batch, tokens, dim) embeddings; output (batch, n_filters) with the filters of the first
    width first. This module's output is the layer the experiments attribute to: it is a cut (every
    path from the embeddings to the logits crosses it).
    """

    def __init__(self, dim: int, widths: Sequence[int], per_width: Sequence[int]):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        # padding = width: every filter sees at least one all-padding window (see module docstring)
        self.convs = nn.ModuleList(nn.Conv1d(dim, n, w, padding=w) for w, n in zip(self.widths, per_width))

    def pre_pool(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per width, the ReLU'd convolution over time: list of (batch, filters_of_width, positions).

        Parameters
        ----------
        x : Tensor, shape (batch, tokens, dim)

        Returns
        -------
        list of Tensor
        """
        h = x.transpose(1, 2)
        return [torch.relu(conv(h)) for conv in self.convs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Max over time of each filter's ReLU'd convolution.

        Parameters
        ----------
        x : Tensor, shape (batch, tokens, dim)

        Returns
        -------
        Tensor, shape (batch, n_filters)
        """
        return torch.cat([a.amax(dim=2) for a in self.pre_pool(x)], dim=1)

    def windows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which tokens each filter's maximum comes from.

        Parameters
        ----------
        x : Tensor, shape (batch, tokens, dim)

        Returns
        -------
        start : LongTensor (batch, n_filters)
            First token of the winning window (may be negative: windows overlap the left padding).
        width : LongTensor (n_filters,)
        """
        starts, widths = [], []
        for w, a in zip(self.widths, self.pre_pool(x)):
            starts.append(a.argmax(dim=2) - w)  # output position p covers padded tokens p..p+w-1
            widths.append(torch.full((a.shape[1],), w, dtype=torch.long))
        return torch.cat(starts, dim=1), torch.cat(widths)


class TextCNN(nn.Module):
    """Sentiment CNN over word embeddings (the attributed network).

    ``forward(embeddings (batch, tokens, dim)) -> logits (batch, 2)``: index 0 rotten (negative),
    1 fresh (positive). Layers: ``filters`` (the max-pooled filter features, (batch, n_filters)),
    ``dropout``, ``fc``.
    """

    def __init__(self, dim: int = 50, n_filters: int = 256, widths: Sequence[int] = (2, 3, 4, 5),
                 n_classes: int = 2, dropout: float = 0.5):
        super().__init__()
        base, extra = divmod(n_filters, len(widths))
        per_width = [base + (1 if i < extra else 0) for i in range(len(widths))]
        self.filters = FilterBank(dim, widths, per_width)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(n_filters, n_classes)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits from word embeddings.

        Parameters
        ----------
        embeddings : Tensor, shape (batch, tokens, dim)

        Returns
        -------
        Tensor, shape (batch, n_classes)
        """
        if embeddings.dim() != 3:
            raise ConductanceError(f"TextCNN takes embeddings (batch, tokens, dim), got shape "
                                   f"{tuple(embeddings.shape)}; embed token ids first (SentimentCNN.embed)")
        return self.fc(self.dropout(self.filters(embeddings)))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (the cache key is made from it)."""

    epochs: int = 4
    batch_size: int = 50
    lr: float = 1e-3
    n_filters: int = 256
    widths: tuple = (2, 3, 4, 5)
    dropout: float = 0.5
    fine_tune_embeddings: bool = True
    train_limit: Optional[int] = None  # use only the first N training reviews (tests)
    seed: int = 0
    dim: int = 50

    def key(self) -> str:
        """File-name-safe key: the cache version plus a hash of the settings.

        Returns
        -------
        str
        """
        blob = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True, default=list)
        return f"{CACHE_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


class SentimentCNN(nn.Module):
    """Vocabulary + embedding table + :class:`TextCNN`; converts texts to embedding batches.

    Attributions are taken on ``self.network`` with the embeddings from :meth:`embed`.
    """

    def __init__(self, vocab: Vocabulary, network: TextCNN, vectors: Optional[torch.Tensor] = None):
        super().__init__()
        self.vocab = vocab
        self.network = network
        dim = cast(nn.Conv1d, network.filters.convs[0]).in_channels
        self.embedding = nn.Embedding(len(vocab), dim, padding_idx=Vocabulary.PAD)
        if vectors is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(vectors)
        with torch.no_grad():
            self.embedding.weight[Vocabulary.PAD].zero_()

    def encode(self, texts: Sequence[str], min_length: int = 1) -> tuple[torch.Tensor, list[list[str]]]:
        """Token ids padded (with 0) to the longest text of the batch.

        Parameters
        ----------
        texts : sequence of str
        min_length : int
            Pad to at least this many tokens.

        Returns
        -------
        ids : LongTensor (batch, tokens)
        tokens : list of token lists (unpadded)
        """
        if isinstance(texts, str):
            raise ConductanceError("pass a list of texts, not one str")
        tokens = [tokenize(t) for t in texts]
        length = max([min_length] + [len(t) for t in tokens])
        ids = torch.zeros((len(tokens), length), dtype=torch.long)
        for i, toks in enumerate(tokens):
            if toks:
                ids[i, :len(toks)] = torch.tensor(self.vocab.encode(toks), dtype=torch.long)
        return ids, tokens

    def embed(self, texts: Sequence[str], min_length: int = 1) -> tuple[torch.Tensor, list[list[str]]]:
        """Embeddings (batch, tokens, dim) of texts, detached, zero rows for padding; and the token lists.

        Parameters
        ----------
        texts : sequence of str
        min_length : int
            As for :meth:`encode`.

        Returns
        -------
        embeddings : Tensor, shape (batch, tokens, dim)
        tokens : list of list of str
        """
        ids, tokens = self.encode(texts, min_length)
        with torch.no_grad():
            return self.embedding(ids), tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits from token ids (embedding, then :class:`TextCNN`).

        Parameters
        ----------
        ids : LongTensor, shape (batch, tokens)

        Returns
        -------
        Tensor, shape (batch, 2)
        """
        return self.network(self.embedding(ids))

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Logits (n, 2) of texts, in eval mode.

        Parameters
        ----------
        texts : sequence of str
        batch_size : int
            Texts per forward pass.

        Returns
        -------
        Tensor, shape (n, 2)
        """
        was = self.training
        self.eval()
        out = [self.network(self.embed(texts[i:i + batch_size])[0]) for i in range(0, len(texts), batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.zeros((0, self.network.fc.out_features))


def accuracy(model: SentimentCNN, texts: Sequence[str], labels: np.ndarray) -> float:
    """Share of texts whose top logit is their label.

    Parameters
    ----------
    model : SentimentCNN
    texts : sequence of str
    labels : ndarray, shape (n,)
        0 rotten, 1 fresh.

    Returns
    -------
    float
        In [0, 1].
    """
    pred = model.predict(list(texts)).argmax(1).numpy()
    return float((pred == np.asarray(labels)).mean())


def _glove_vectors(vocab: Vocabulary, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Embedding table: GloVe where available, small random vectors otherwise; row 0 zero."""
    from ...datasets import load_glove

    words, vectors = load_glove(vocab.words[1:])
    if vectors.shape[1] != dim:
        raise ConductanceError(f"GloVe vectors have {vectors.shape[1]} dimensions, the config asks for {dim}")
    table = torch.randn((len(vocab), dim), generator=generator) * float(vectors.std())
    for w, v in zip(words, vectors):
        table[vocab.index[w]] = torch.from_numpy(np.asarray(v))
    table[Vocabulary.PAD] = 0
    return table, len(words)


def train(texts: Sequence[str], labels: np.ndarray, config: TrainConfig = TrainConfig(),
          log=None, progress: Optional[bool] = None) -> tuple[SentimentCNN, dict]:
    """Train the sentiment CNN from scratch (seeded; deterministic on the CPU).

    Parameters
    ----------
    texts : list of str (n,)
    labels : int array (n,), 1 = fresh (positive), 0 = rotten
    config : TrainConfig
    log : callable(str), optional
        Receives one line per epoch.
    progress : bool, optional
        A bar counting the training batches of all epochs on stderr (None: when stderr is a terminal).

    Returns
    -------
    model : SentimentCNN in eval mode
    info : dict with ``vocab_size``, ``glove_words``, ``epoch_seconds``, ``epoch_loss``, ``train_examples``
    """
    from ...datasets import load_glove

    texts = list(texts)
    labels = np.asarray(labels, dtype=np.int64)
    if len(texts) != len(labels) or not len(texts):
        raise ConductanceError(f"train needs as many labels as texts (got {len(texts)} texts, {len(labels)} labels)")
    if config.train_limit is not None:
        texts, labels = texts[:config.train_limit], labels[:config.train_limit]
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    tokens = [tokenize(t) for t in texts]
    candidates = sorted({t for toks in tokens for t in toks})
    known = set(load_glove(candidates)[0])
    vocab = Vocabulary.build(tokens, known=known)
    table, n_glove = _glove_vectors(vocab, config.dim, gen)
    network = TextCNN(config.dim, config.n_filters, config.widths, dropout=config.dropout)
    model = SentimentCNN(vocab, network, table)
    model.embedding.weight.requires_grad_(config.fine_tune_embeddings)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    ids_all = [torch.tensor(vocab.encode(t), dtype=torch.long) for t in tokens]
    y_all = torch.from_numpy(labels)
    info: dict[str, Any] = {"vocab_size": len(vocab), "glove_words": n_glove, "epoch_seconds": [], "epoch_loss": [],
            "train_examples": len(texts)}
    model.train()
    bar = Progress(progress, config.epochs * -(-len(texts) // config.batch_size), "training the sentiment CNN",
                   "batches")
    for epoch in range(config.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(texts), generator=gen)
        total, seen = 0.0, 0
        for b in range(0, len(order), config.batch_size):
            idx = order[b:b + config.batch_size]
            batch = nn.utils.rnn.pad_sequence([ids_all[i] for i in idx], batch_first=True,
                                              padding_value=Vocabulary.PAD)
            loss = nn.functional.cross_entropy(model(batch), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.update(1)
        info["epoch_seconds"].append(round(time.perf_counter() - start, 2))
        info["epoch_loss"].append(total / seen)
        if log:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {total / seen:.4f} ({info['epoch_seconds'][-1]:.1f} s)")
    bar.close()
    model.eval()
    return model, info


def cache_path(config: TrainConfig) -> str:
    """Where the weights of ``config`` are cached.

    Parameters
    ----------
    config : TrainConfig

    Returns
    -------
    str
    """
    return os.path.join(cache_dir(), f"{config.key()}.pt")


def _save(model: SentimentCNN, config: TrainConfig, info: dict, path: str) -> None:
    payload = {"config": asdict(config), "vocab": model.vocab.words[1:], "state_dict": model.state_dict(),
               "info": info}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave half a file behind


def _load(config: TrainConfig, path: str) -> tuple[SentimentCNN, dict]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    vocab = Vocabulary(payload["vocab"])
    network = TextCNN(config.dim, config.n_filters, config.widths, dropout=config.dropout)
    model = SentimentCNN(vocab, network)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["info"]


def load_or_train(config: TrainConfig = TrainConfig(), log=None, progress: Optional[bool] = None
                  ) -> tuple[SentimentCNN, dict]:
    """The trained model for ``config``: from the cache, or trained on the training split and cached.

    Parameters
    ----------
    config : TrainConfig
    log : callable str -> None, optional
    progress : bool, optional
        A bar over the training batches when it trains (see :func:`train`).

    Returns
    -------
    model : SentimentCNN (eval mode)
    info : dict, as from :func:`train`, plus ``cached`` (bool), ``path`` and ``train_seconds``
    """
    from ...datasets import load_rotten_tomatoes

    path = cache_path(config)
    if os.path.isfile(path):
        try:
            model, info = _load(config, path)
            return model, {**info, "cached": True, "path": path}
        except Exception as exc:  # a corrupt or foreign file: retrain rather than fail
            if log:
                log(f"cached weights {path} unreadable ({exc}); retraining")
    texts, labels = load_rotten_tomatoes("train")
    start = time.perf_counter()
    model, info = train(texts, labels, config, log=log, progress=progress)
    info["train_seconds"] = round(time.perf_counter() - start, 2)
    _save(model, config, info, path)
    return model, {**info, "cached": False, "path": path}
