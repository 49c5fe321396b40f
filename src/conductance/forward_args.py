"""The forward arguments after the inputs: one normaliser and one per-example rule for every module.

Every call that runs a user's model with ``additional_forward_args`` / ``forward_kwargs`` (the
path engine, ablation, feature selection, dataset aggregation, the transformer helpers) turns
them into a :class:`ForwardArgs` here and asks it for the arguments of each forward. The rule,
written once: a tensor (also inside a tuple, list, named tuple or dict) whose first dimension
equals the batch size is per example, and a row of a forward pass that belongs to example ``i``
gets its row ``i``; anything else, and anything wrapped in :func:`shared`, goes to every row
unchanged. A per-example tensor that looks like a shared one (a parameter, a square float matrix
(batch, batch)) draws a warning naming :func:`shared`.

The module depends on torch only (the engine imports it), so it can serve every other module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .errors import ConductanceError, warn


class Shared:
    """A forward argument given to every row unchanged, whatever its shape.

    Without it, a tensor in ``additional_forward_args`` or ``forward_kwargs`` whose first
    dimension equals the batch size is per example (see :func:`take_rows`)."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        shape = tuple(self.value.shape) if isinstance(self.value, torch.Tensor) else type(self.value).__name__
        return f"shared({shape})"


def shared(value: Any) -> Shared:
    """Mark a forward argument as shared by all examples: passed unchanged to every path point.

    Use it for a tensor whose first dimension happens to equal the batch size but does not index
    the examples (a weight matrix, a lookup table).

    Parameters
    ----------
    value : Any
        A tensor (any shape) or other forward argument.

    Returns
    -------
    Shared
        A wrapper the engine unwraps; pass it in ``additional_forward_args`` or ``forward_kwargs``.
    """
    return Shared(value)


def check_forward_args(additional_forward_args: Any, forward_kwargs: Any) -> tuple[tuple, dict]:
    """The positional and keyword arguments after the inputs, in the forms the engine uses.

    Parameters
    ----------
    additional_forward_args : None, a tuple, or one value
        Lists and dicts are refused (ambiguous).
    forward_kwargs : None or dict str -> Any

    Returns
    -------
    args : tuple
    kwargs : dict
    """
    extra = additional_forward_args
    if extra is None:
        extra = ()
    elif isinstance(extra, (list, dict)):
        hint = ("pass keyword arguments as forward_kwargs=" if isinstance(extra, dict) else
                f"to pass one list as a single argument wrap it: additional_forward_args=(your_list,); for "
                f"{len(extra)} positional arguments pass a tuple")
        raise ConductanceError(f"additional_forward_args must be a tuple of the positional arguments after the "
                               f"inputs (or one non-list, non-dict value); got a {type(extra).__name__}: {hint}")
    elif not isinstance(extra, tuple):
        extra = (extra,)
    if forward_kwargs is None:
        forward_kwargs = {}
    if not isinstance(forward_kwargs, Mapping) or not all(isinstance(k, str) for k in forward_kwargs):
        raise ConductanceError(f"forward_kwargs must be a dict of keyword name -> value for the model; got "
                               f"{type(forward_kwargs).__name__}" + (" with non-string keys" if
                                                                     isinstance(forward_kwargs, Mapping) else "")
                               + ". Positional arguments go in additional_forward_args (a tuple)")
    return extra, dict(forward_kwargs)


def _rebuild(container: Any, items: list) -> Any:
    """A tuple, named tuple or list of the same type as ``container`` holding ``items``."""
    if isinstance(container, tuple) and hasattr(container, "_fields"):
        return type(container)(*items)
    return tuple(items) if isinstance(container, tuple) else items


def take_rows(args: Any, rows: Optional[torch.Tensor], batch: int, *, keep_shared: bool = False) -> Any:
    """``args`` for rows that belong to the examples ``rows``: the per-example rule.

    Parameters
    ----------
    args : Any
        A forward argument, or a tuple, named tuple, list or dict of them.
    rows : LongTensor, shape (m,), or None
        Example index of each row; None keeps every tensor whole (no indexing).
    batch : int
        Number of examples: a tensor (batch, ...) is per example.
    keep_shared : bool
        Keep :class:`Shared` wrappers (for arguments handed on to another call of the library,
        which unwraps them itself); by default they are unwrapped, for the model.

    Returns
    -------
    Any
        The same structure; each per-example tensor (batch, ...) becomes (m, ...), on its own device.
    """
    if isinstance(args, Shared):
        return args if keep_shared else args.value
    if isinstance(args, torch.Tensor):
        if rows is None or args.dim() == 0 or args.shape[0] != batch:
            return args
        return args[rows.to(args.device)]
    if isinstance(args, (tuple, list)):
        return _rebuild(args, [take_rows(a, rows, batch, keep_shared=keep_shared) for a in args])
    if isinstance(args, dict):
        return {k: take_rows(v, rows, batch, keep_shared=keep_shared) for k, v in args.items()}
    return args


def unwrap_shared(args: Any) -> Any:
    """``args`` with every :class:`Shared` replaced by its value (nothing indexed).

    Parameters
    ----------
    args : Any
        A forward argument, possibly a tuple, list or dict of them.

    Returns
    -------
    Any
        The same structure without :class:`Shared` wrappers.
    """
    return take_rows(args, None, 0)


def ambiguous_args(args: Any, batch: int, where: str) -> list[str]:
    """Per-example forward arguments that may be shared ones whose first dimension equals the batch
    size by coincidence: parameters (or tensors that require grad), and square floating-point
    matrices (batch, batch). Integer tensors (token ids, masks) are taken as per example.

    Parameters
    ----------
    args : Any
        Forward arguments (a tensor, or a tuple, list or dict of them).
    batch : int
        Number of examples.
    where : str
        Name of ``args`` for the messages (``"forward_kwargs"``).

    Returns
    -------
    list of str
        One description (name and shape) per doubtful tensor; empty when none is.
    """
    if isinstance(args, torch.Tensor):
        if args.dim() > 0 and args.shape[0] == batch and (
                isinstance(args, nn.Parameter) or args.requires_grad
                or (batch > 1 and args.is_floating_point() and tuple(args.shape) == (batch, batch))):
            return [f"{where} of shape {tuple(args.shape)}"]
        return []
    if isinstance(args, (tuple, list)):
        return [w for i, a in enumerate(args) for w in ambiguous_args(a, batch, f"{where}[{i}]")]
    if isinstance(args, dict):
        return [w for k, v in args.items() for w in ambiguous_args(v, batch, f"{where}[{k!r}]")]
    return []


@dataclass(frozen=True)
class ForwardArgs:
    """The checked forward arguments of one call over a batch of ``batch`` examples.

    Build it with :meth:`make`; the model is then called as
    ``model(x, *args, **kwargs)`` with ``args, kwargs = fa.at(rows)`` for rows of examples ``rows``.

    Attributes
    ----------
    args : tuple
        Positional arguments after the inputs (``Shared`` wrappers kept).
    kwargs : dict
        Keyword arguments (``Shared`` wrappers kept).
    batch : int
        Number of examples; a tensor (batch, ...) in either is per example.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    batch: int = 0

    @classmethod
    def make(cls, additional_forward_args: Any, forward_kwargs: Any, batch: int, *,
             warn_ambiguous: bool = True) -> ForwardArgs:
        """Check the arguments (see :func:`check_forward_args`) and, by default, warn about doubtful ones.

        Parameters
        ----------
        additional_forward_args : None, a tuple, or one value
        forward_kwargs : None or dict str -> Any
        batch : int
            Number of examples of the inputs they go with.
        warn_ambiguous : bool
            Warn (ConductanceWarning) about per-example tensors that look shared (:func:`ambiguous_args`).

        Returns
        -------
        ForwardArgs
        """
        args, kwargs = check_forward_args(additional_forward_args, forward_kwargs)
        made = cls(args, kwargs, int(batch))
        if warn_ambiguous:
            made.warn_ambiguous()
        return made

    def ambiguous(self) -> list[str]:
        """Descriptions of the per-example tensors that look like shared ones (see :func:`ambiguous_args`).

        Returns
        -------
        list of str
        """
        return (ambiguous_args(self.args, self.batch, "additional_forward_args")
                + ambiguous_args(self.kwargs, self.batch, "forward_kwargs"))

    def warn_ambiguous(self) -> None:
        """Warn once, naming every doubtful tensor and :func:`shared`, when there is any."""
        unclear = self.ambiguous()
        if unclear:
            warn(f"{', '.join(unclear)}: the first dimension equals the batch size ({self.batch}), so each row goes "
                 "with one example (the per-example rule), but it looks like a shared tensor (a parameter, or a "
                 "square float matrix). If it is shared by all examples, pass conductance.shared(tensor)")

    def at(self, rows: Optional[torch.Tensor] = None) -> tuple[tuple, dict]:
        """The arguments for a forward pass whose rows belong to the examples ``rows``, ready for the model.

        Parameters
        ----------
        rows : LongTensor, shape (m,), optional
            Example index of each row; None: the whole batch in order (nothing indexed).

        Returns
        -------
        args : tuple
        kwargs : dict
            Per-example tensors (batch, ...) indexed to (m, ...); ``Shared`` values unwrapped.
        """
        return take_rows(self.args, rows, self.batch), take_rows(self.kwargs, rows, self.batch)

    def subset(self, rows: torch.Tensor) -> ForwardArgs:
        """The arguments of the examples ``rows`` as a batch of their own (``Shared`` wrappers kept).

        Parameters
        ----------
        rows : LongTensor, shape (m,)

        Returns
        -------
        ForwardArgs
            Over a batch of ``m`` examples.
        """
        return ForwardArgs(take_rows(self.args, rows, self.batch, keep_shared=True),
                           take_rows(self.kwargs, rows, self.batch, keep_shared=True), int(rows.shape[0]))

    def keywords(self) -> dict[str, Any]:
        """``additional_forward_args=`` and ``forward_kwargs=`` for another public call (``Shared`` kept).

        Returns
        -------
        dict
        """
        return {"additional_forward_args": self.args, "forward_kwargs": dict(self.kwargs)}
