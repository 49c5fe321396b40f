"""The sentiment CNN's tokeniser, its negation words and its vocabulary.

Contractions are split the way GloVe's corpus was tokenised, so that the pieces have vectors; the
vocabulary maps padding and unknown words alike to id 0 (the zero embedding).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Optional

from ...errors import ConductanceError
from .. import cache_dir  # noqa: F401  (shared cache folder; re-exported)

#: Words (tokens after :func:`tokenize`) that negate: "n't" is split off contractions ("isn't" -> "is n't").
NEGATION_WORDS = frozenset({"not", "no", "never", "n't", "nothing", "neither", "nor", "none", "cannot",
                            "nobody", "nowhere", "without", "hardly", "barely", "scarcely"})


# Contractions are split the way GloVe's training corpus was tokenised ("don't" -> "do n't",
# "it's" -> "it 's"), so that the split pieces have vectors. Numbers and words may contain inner
# hyphens or periods ("sci-fi", "u.s."), and letters may be accented ("película"); every other
# non-space character is a token by itself.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-.][^\W_]+)*|[^\s\w]|_")


_NT = re.compile(r"([^\W_])n't\b")


def tokenize(text: str) -> list[str]:
    """Lower-case regex tokenisation of one text.

    Parameters
    ----------
    text : str

    Returns
    -------
    list of str
        E.g. ``"It isn't GOOD."`` -> ``["it", "is", "n't", "good", "."]``; ``"can't"`` -> ``["ca", "n't"]``.
    """
    if not isinstance(text, str):
        raise ConductanceError(f"tokenize takes a str, got {type(text).__name__}")
    lowered = text.lower().replace("\u2019", "'").replace("`", "'")
    return _TOKEN.findall(_NT.sub(r"\1 n't", lowered))


def negation_tokens(tokens: Sequence[str]) -> list[str]:
    """The tokens of ``tokens`` that are negation words (see :data:`NEGATION_WORDS`).

    Parameters
    ----------
    tokens : sequence of str

    Returns
    -------
    list of str
    """
    return [t for t in tokens if t in NEGATION_WORDS]


def has_negation(text_or_tokens) -> bool:
    """Whether a text (str) or a token list contains a negation word.

    Parameters
    ----------
    text_or_tokens : str or sequence of str

    Returns
    -------
    bool
    """
    tokens = tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
    return any(t in NEGATION_WORDS for t in tokens)


class Vocabulary:
    """Word <-> id map. Id 0 is padding AND unknown words: both map to the zero embedding.

    Parameters
    ----------
    words : sequence of str
        The known words, in id order starting at 1.
    """

    PAD = 0

    def __init__(self, words: Sequence[str]):
        self.words = ["<pad>"] + list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ConductanceError("vocabulary words must be unique")

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], known: Optional[set] = None, min_count: int = 1,
              min_count_unknown: int = 2) -> Vocabulary:
        """Vocabulary of a training split.

        Parameters
        ----------
        token_lists : iterable of token lists
        known : set of str, optional
            Words with a pretrained vector; they are kept from ``min_count`` occurrences, other words
            from ``min_count_unknown`` (a word seen once without a vector cannot be learnt).

        Returns
        -------
        Vocabulary
        """
        counts = Counter(t for tokens in token_lists for t in tokens)
        keep = [w for w, c in counts.items()
                if c >= (min_count if known is None or w in known else min_count_unknown)]
        # most frequent first, ties alphabetical: the same order on every machine
        keep.sort(key=lambda w: (-counts[w], w))
        return cls(keep)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index and self.index[word] != self.PAD

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids; unknown words get id 0 (the zero embedding, like padding).

        Parameters
        ----------
        tokens : sequence of str

        Returns
        -------
        list of int
        """
        return [self.index.get(t, self.PAD) for t in tokens]
