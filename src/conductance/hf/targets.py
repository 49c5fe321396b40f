"""Language-model targets (:func:`next_token`, :func:`continuation`) and binding a target to a batch."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Union, cast

import torch
from torch import nn

from ..errors import ConductanceError
from ..forward_args import ForwardArgs

# ----------------------------------------------------------------------------------------------
# language-model targets
# ----------------------------------------------------------------------------------------------

#: What a :func:`next_token` target explains.
TOKEN_SCORES = ("logit", "logprob", "prob")


@dataclass(frozen=True)
class NextToken:
    """Target: the score of each example's next token at a position (see :func:`next_token`)."""

    kind: str
    position: Any
    token: Any


@dataclass(frozen=True)
class Continuation:
    """Target: the summed log-probability of each example's continuation (see :func:`continuation`)."""

    length: Any


def next_token(kind: str = "logprob", position: Union[int, torch.Tensor] = -1,
               token: Union[None, int, torch.Tensor] = None) -> NextToken:
    """A language-model target: each example's next token at a position, as logit, log-probability or probability.

    The model's output (batch, tokens, vocab) at position ``p`` scores the token after ``p``.

    Parameters
    ----------
    kind : {"logit", "logprob", "prob"}
        The explained scalar: the raw logit, ``log_softmax`` over the vocabulary, or its ``exp``.
    position : int or LongTensor (batch,)
        Counted over each example's real tokens (``attention_mask`` 1, or all tokens without a
        mask): -1 is each example's last real token, whatever the padding side; 0 its first.
    token : None, int or LongTensor (batch,)
        The token scored; None: each example's top prediction at the input.

    Returns
    -------
    NextToken
        Pass it as ``target=`` to :func:`layer_conductance`; the strings "logit", "logprob" and
        "prob" are short for ``next_token(kind)``. Bound to a batch, it gives one score per
        example (batch,).
    """
    if kind not in TOKEN_SCORES:
        raise ConductanceError(f"next_token kind must be one of {TOKEN_SCORES}, got {kind!r}")
    return NextToken(kind, position, token)


def continuation(length: Union[int, torch.Tensor]) -> Continuation:
    """A language-model target: the summed log-probability of a continuation, teacher-forced.

    ``input_ids`` hold prompt + continuation; the last ``length`` real tokens of each example are
    the continuation ``c_1..c_L`` and the explained scalar is ``sum_j log p(c_j | tokens before
    c_j)``, read from one forward (teacher forcing). Every token's embedding, continuation
    included, moves along the path.

    Parameters
    ----------
    length : int or LongTensor (batch,), >= 1 and below each example's number of real tokens

    Returns
    -------
    Continuation
        Pass it as ``target=`` to :func:`layer_conductance`; bound to a batch, it gives one summed
        log-probability per example (batch,).
    """
    return Continuation(length)


def _per_example(value: Any, batch: int, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return torch.full((batch,), int(value), dtype=torch.long, device=device)
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
        t = value.to(device=device, dtype=torch.long).flatten()
        if t.numel() == 1:
            return t.expand(batch).clone()
        if t.shape == (batch,):
            return t
    raise ConductanceError(f"{name} must be an int or a LongTensor of shape ({batch},), got "
                           f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")


def _real_positions(input_ids: torch.Tensor, mask: Any) -> list[torch.Tensor]:
    if isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape:
        return [row.nonzero().flatten().to(input_ids.device) for row in mask.bool()]
    return [torch.arange(input_ids.shape[1], device=input_ids.device)] * input_ids.shape[0]


def _float(t: torch.Tensor) -> torch.Tensor:
    """Scores in at least float32 (bf16 / fp16 models), float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _bind_target(target: Any, model: nn.Module, input_ids: torch.Tensor, fargs: ForwardArgs) -> tuple[Any, str]:
    """Turn a language-model target into what the engine takes (index tuples or a callable(output, examples)).

    ``fargs``: the call's forward arguments after the token ids."""
    if isinstance(target, str):
        if target not in TOKEN_SCORES:
            raise ConductanceError(f"unknown target {target!r}: the named targets are {TOKEN_SCORES} (the next "
                                   "token after each example's last real token), cd.hf.next_token(...) and "
                                   "cd.hf.continuation(...)")
        target = NextToken(target, -1, None)
    if not isinstance(target, (NextToken, Continuation)):
        return target, ""
    from ..engine import logits_of

    B = input_ids.shape[0]
    device = input_ids.device
    kwargs = fargs.at()[1]
    real = _real_positions(input_ids, kwargs.get("attention_mask"))
    if isinstance(target, Continuation):
        lengths = _per_example(target.length, B, "continuation length", device)
        L = int(lengths.max())
        pred = torch.zeros(B, L, dtype=torch.long, device=device)
        toks = torch.zeros(B, L, dtype=torch.long, device=device)
        valid = torch.zeros(B, L, dtype=torch.bool, device=device)
        for b in range(B):
            n = int(lengths[b])
            if not 1 <= n < len(real[b]):
                raise ConductanceError(f"continuation length {n} of example {b} must be >= 1 and below its "
                                       f"{len(real[b])} real tokens (a prompt token must precede it)")
            where = real[b][-n:]
            pred[b, :n], toks[b, :n], valid[b, :n] = real[b][-n - 1:-1], input_ids[b, where], True

        def summed_logprob(output: Any, examples: torch.Tensor) -> torch.Tensor:
            logits = logits_of(output)
            e = examples.to(logits.device)
            rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
            lp = torch.log_softmax(_float(logits[rows, cast(Any, summed_logprob).read_at.to(logits.device)[e]]), -1)
            picked = lp.gather(2, toks.to(logits.device)[e].unsqueeze(2)).squeeze(2)
            return (picked * valid.to(logits.device)[e]).sum(1)

        _reads(summed_logprob, pred)
        shown = lengths.tolist()
        return summed_logprob, (f"summed log-probability of the last {shown if B > 1 else shown[0]} tokens "
                                "(teacher-forced continuation)")
    position = _per_example(target.position, B, "position", device)
    pos = torch.empty(B, dtype=torch.long, device=device)
    for b in range(B):
        p, n = int(position[b]), len(real[b])
        if not -n <= p < n:
            raise ConductanceError(f"position {p} of example {b} is out of range: it has {n} real tokens "
                                   "(positions count over the tokens with attention_mask 1)")
        pos[b] = real[b][p]
    chosen: dict[str, torch.Tensor] = {}
    if target.token is None:
        which = "top predicted token"
    else:
        chosen["token"] = _per_example(target.token, B, "token", device)
        which = "token " + (str(chosen["token"].tolist()) if B > 1 else str(int(chosen["token"][0])))
    label = {"logit": "logit", "logprob": "log-probability", "prob": "probability"}[target.kind]
    shown = pos.tolist()
    description = f"{label} of the {which} after position {shown if B > 1 else shown[0]}"
    if target.kind == "logit" and target.token is not None:
        return torch.stack([pos, chosen["token"]], 1), description

    def score(output: Any, examples: torch.Tensor) -> torch.Tensor:
        if "token" not in chosen:
            raise RuntimeError("the next-token target scored an output before its top tokens were chosen")
        logits = logits_of(output)
        e = examples.to(logits.device)
        rows = torch.arange(logits.shape[0], device=logits.device)
        at = logits[rows, cast(Any, score).read_at.to(logits.device)[e, 0]]
        token = chosen["token"].to(logits.device)[e].unsqueeze(1)
        if target.kind == "logit":
            return at.gather(1, token).squeeze(1)
        value = torch.log_softmax(_float(at), -1).gather(1, token).squeeze(1)
        return value.exp() if target.kind == "prob" else value

    _reads(score, pos.unsqueeze(1))
    if target.token is None:
        def choose(output: Any) -> None:
            # the model's output at the inputs, from the engine's first forward (which checks the target
            # anyway), read where the target reads: no forward of its own, and with logits_to_keep the
            # vocabulary projection of the read positions only
            logits = logits_of(output)
            if logits.dim() != 3:
                raise ConductanceError(f"a next-token target needs a language model output (batch, tokens, vocab); "
                                       f"the model returns {tuple(logits.shape)}")
            at = cast(Any, score).read_at.to(logits.device)[:, 0]
            chosen["token"] = logits[torch.arange(B, device=logits.device), at].argmax(-1).to(device)

        cast(Any, score).choose_at_inputs = choose
        if target.kind == "logit":
            # reported as the (position, token) pairs explained, as a logit of a given token is
            cast(Any, score).reported_pairs = lambda: torch.stack([pos, chosen["token"]], 1)
    return score, description


def _reads(fn: Any, positions: torch.Tensor) -> None:
    """Mark a bound target as reading the logits at ``positions`` (batch, k) of each example only.

    ``fn.positions`` stays; ``fn.read_at`` is where it indexes the output's position dimension, the
    same until the caller has the model compute only those logits (``logits_to_keep``) and sets it
    to ``0..k-1`` (see :func:`conductance.hf.path._lean_lm_forward`)."""
    fn.positions = positions
    fn.read_at = positions
