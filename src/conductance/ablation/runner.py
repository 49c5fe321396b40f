"""The batched runner: one session evaluates many ablated prefixes of a ranking per forward pass."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..engine import logits_of
from ..errors import ConductanceError
from ..forward_args import ForwardArgs
from ..inputs import check_baselines
from ..layers import LayerRef, LayerSpec
from ..progress import Progress
from ..sites import intervene, warn_training
from .intervene import (
    _apply,
    _broadcast_values,
    _check_batch_inputs,
    _check_mode,
    _check_unit_type,
    _describe,
    _one_layer,
    _record,
    _unit_info,
)
from .rankings import _orders

#: Rows (example, prefix) per forward pass when no ``batch_size`` is given: about this many
#: input elements per forward, at most MAX_DEFAULT_ROWS rows.
DEFAULT_ROW_ELEMENTS = 2 ** 23


MAX_DEFAULT_ROWS = 1024


#: First prefix window of flip_count when the layers below run once per example (rows are cheap).
EXPANDED_FIRST_WINDOW = 8


# --------------------------------------------------------------------------------------------
# the batched runner


class _ExpandFailed(Exception):
    """The model cannot take a layer output expanded to more rows than the layers below computed."""


def _tensor_leaves(obj: Any) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensor_leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensor_leaves(o)]
    return []


@contextlib.contextmanager
def _shrink_inputs(model: nn.Module, swap: dict) -> Iterator[None]:
    """Pre-hooks on every submodule: a module called with one of the full-row tensors in ``swap``
    (by identity) gets the tensor with one row per distinct example instead."""
    def swap_one(value: Any) -> Any:
        return swap.get(id(value), value) if isinstance(value, torch.Tensor) else value

    def edit(args: tuple, kwargs: dict) -> Any:
        if any(isinstance(a, torch.Tensor) and id(a) in swap for a in args) or any(
                isinstance(v, torch.Tensor) and id(v) in swap for v in kwargs.values()):
            return tuple(swap_one(a) for a in args), {k: swap_one(v) for k, v in kwargs.items()}
        return None

    submodules = [LayerRef(name, module, None, True) for name, module in model.named_modules() if name]
    if not submodules:
        yield
        return
    with intervene(model, dict.fromkeys(submodules, edit), whole=True):
        yield


class _Session:
    """One model, batch and layer: the unablated forward, and batched ablated forwards.

    A forward evaluates rows; a row is (example, set of ablated units), and rows are kept
    ordered by example. Two ways to run them:

    - plain: each row repeats its example's inputs, the hook on the layer masks row by row;
    - expanded: the model is called with one input row per row (so code such as
      ``x.view(inputs.size(0), -1)`` sees the right batch), but every submodule that is
      handed the inputs (or a per-example forward argument) receives them with one row per
      distinct example, so the layers below the ablated one run once per example; the hook
      expands the layer's output to one row per (example, ablation). For a deep layer this
      skips most of the work.

    ``expand_at_layer=None`` decides once, by a probe on two examples: the expanded run must
    go through and give the same scores as the plain run (else plain is used).
    """

    # declared here: __init__'s inferred types reach the methods (and flips / curves / summary) too late
    batch_size: int
    expand_note: str
    output: Any
    labels: torch.Tensor
    layer_shape: tuple[int, ...]
    unit_shape: tuple[int, ...]
    n_units: int
    n_forwards: int
    rows_evaluated: int

    def __init__(self, model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, *, mode: str, values: Any,
                 units: str, baselines: Any, additional_forward_args: Any, forward_kwargs: Optional[dict],
                 batch_size: Optional[int], expand_at_layer: Optional[bool]) -> None:
        _check_unit_type(units, "units")
        _check_mode(mode, values)
        self.ref = _one_layer(model, layer)
        self.model = model
        self.inputs = _check_batch_inputs(inputs)
        self.batch = int(self.inputs.shape[0])
        self.device = self.inputs.device
        self.bar: Optional[Progress] = None   # counts ablated rows while a public call runs
        self.fargs = ForwardArgs.make(additional_forward_args, forward_kwargs, self.batch)
        self.mode, self.units = mode, units
        if batch_size is None:
            per = max(1, self.inputs[0].numel())
            batch_size = int(max(1, min(MAX_DEFAULT_ROWS, DEFAULT_ROW_ELEMENTS // per)))
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConductanceError(f"batch_size must be a positive integer (rows per forward pass); got {batch_size!r}")
        self.batch_size = int(batch_size)
        if expand_at_layer not in (None, True, False):
            raise ConductanceError(f"expand_at_layer must be None (probe and decide), True or False; got "
                                   f"{expand_at_layer!r}")
        self.expand: Optional[bool] = expand_at_layer
        self.expand_note = "requested" if expand_at_layer is not None else "not probed yet"
        warn_training(model, "ablation results")
        self.output, layer_out = _record(model, self.ref, self.inputs, *self.fargs.at())
        scores = logits_of(self.output)
        if scores.dim() != 2 or scores.shape[0] != self.batch:
            raise ConductanceError(f"ablation compares top-1 labels, so the model must return scores of shape "
                                   f"(batch, classes); it returned {tuple(scores.shape)}")
        self.labels = scores.argmax(1)
        self.layer_shape = tuple(layer_out.shape[1:])
        self.unit_shape, self.n_units = _unit_info(self.ref, layer_out.shape, units)
        self.values: Optional[torch.Tensor] = None
        if mode == "baseline" and values is None:
            if baselines is None:
                base = torch.zeros_like(self.inputs)
            elif self.inputs.is_floating_point():
                base = check_baselines(baselines, self.inputs)
            else:  # e.g. token ids: a pad-token baseline
                base = torch.as_tensor(baselines, device=self.device).expand_as(self.inputs)
            _, values = _record(model, self.ref, base, *self.fargs.at())
        if mode != "zero":
            self.values = _broadcast_values(values, self.batch, self.layer_shape, units, self.ref, mode).to(self.device)
        self.n_forwards = 0
        self.rows_evaluated = 0

    # -- rankings

    def orders(self, ranking: Any) -> torch.Tensor:
        return _orders(ranking, self.ref, self.batch, self.n_units, self.layer_shape, self.unit_shape, self.units,
                       self.device)

    def check_k(self, k: Any, limit: int, what: str) -> int:
        if isinstance(k, (np.integer, torch.Tensor)):
            k = k.item()
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise ConductanceError(f"{what} must be an integer, got {k!r}")
        if int(k) < 0:
            raise ConductanceError(f"{what}={k} is negative; give a number of units between 0 and {limit}")
        if int(k) > limit:
            if limit < self.n_units:
                raise ConductanceError(f"{what}={k} is larger than the ranking's {limit} units; rank more units "
                                       f"or lower {what} to at most {limit}")
            raise ConductanceError(f"{what}={k} is larger than the number of units: "
                                   f"{_describe(self.ref, self.layer_shape, self.units, self.n_units)}; use at most "
                                   f"{limit}")
        return int(k)

    # -- forwards

    def run(self, rows_ex: torch.Tensor, mask_fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """Scores (rows, classes) for rows of examples ``rows_ex`` (sorted), ablating ``mask_fn(chunk)``."""
        if self.expand is None:
            self._probe()
        outs = []
        for start in range(0, rows_ex.shape[0], self.batch_size):
            chunk = slice(start, min(start + self.batch_size, rows_ex.shape[0]))
            try:
                outs.append(self._forward(rows_ex[chunk], mask_fn(chunk), bool(self.expand)))
                if self.bar is not None:
                    self.bar.update(chunk.stop - chunk.start)
            except (_ExpandFailed, RuntimeError) as exc:
                if not self.expand:
                    raise
                raise ConductanceError(f"the model cannot run with layer {self.ref.name!r}'s output expanded to "
                                       f"more rows than the layers below computed ({str(exc).splitlines()[0][:200]}); "
                                       "use expand_at_layer=False (every row repeats the whole forward)") from exc
        return torch.cat(outs)

    def _repl(self, rows_ex: torch.Tensor) -> Optional[torch.Tensor]:
        if self.values is None:
            return None
        return self.values if self.values.shape[0] == 1 else self.values[rows_ex]

    def _probe(self) -> None:
        """Decide ``expand``: two examples, two rows each (nothing ablated; every other unit ablated)."""
        ex = torch.arange(min(2, self.batch), device=self.device).repeat_interleave(2)
        mask = torch.zeros(ex.shape[0], self.n_units, dtype=torch.bool, device=self.device)
        mask[1::2, ::2] = True
        try:
            expanded = self._forward(ex, mask, True)
        except ConductanceError:
            raise
        except (_ExpandFailed, RuntimeError) as exc:
            self.expand, self.expand_note = False, f"probe failed: {str(exc).splitlines()[0][:200]}"
            return
        plain = self._forward(ex, mask, False)
        scale = float(plain.abs().max().clamp(min=1e-12))
        if torch.allclose(expanded, plain, rtol=1e-3, atol=1e-4 * scale):
            self.expand, self.expand_note = True, "probe agreed with the plain run"
        else:
            diff = float((expanded - plain).abs().max())
            self.expand, self.expand_note = False, f"probe differed from the plain run by {diff:.3g}"

    def _forward(self, rows_ex: torch.Tensor, mask: torch.Tensor, expand: bool) -> torch.Tensor:
        rows = rows_ex.shape[0]
        repl = self._repl(rows_ex)
        x = self.inputs[rows_ex]
        args, kwargs = self.fargs.at(rows_ex)
        feed_ex, local = torch.unique_consecutive(rows_ex, return_inverse=True)
        shrink = expand and feed_ex.shape[0] < rows

        def fn(t: torch.Tensor) -> torch.Tensor:
            if shrink and t.shape[0] == feed_ex.shape[0]:
                t = t[local]
            elif t.shape[0] != rows:
                raise _ExpandFailed(f"layer {self.ref.name!r} produced {t.shape[0]} rows for {rows} rows of "
                                    f"{feed_ex.shape[0]} examples")
            return _apply(t, mask, repl, self.units)

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if shrink:
                swap = {id(x): self.inputs[feed_ex]}
                small = _tensor_leaves(self.fargs.at(feed_ex))
                for full, part in zip(_tensor_leaves((args, kwargs)), small):
                    if full.shape[:1] == (rows,) and part.shape[:1] == feed_ex.shape:
                        swap[id(full)] = part
                stack.enter_context(_shrink_inputs(self.model, swap))
            hooked = stack.enter_context(intervene(self.model, {self.ref: fn}, once=True, need="an ablation"))
            out = self.model(x, *args, **kwargs)
        self.n_forwards += 1
        self.rows_evaluated += rows
        hooked.require()
        scores = logits_of(out)
        if scores.dim() != 2 or scores.shape[0] != rows:
            if expand:
                raise _ExpandFailed(f"the output has shape {tuple(scores.shape)} for {rows} rows")
            raise ConductanceError(f"the model returned scores of shape {tuple(scores.shape)} for {rows} input "
                                   "rows; ablation needs (rows, classes)")
        return scores

    # -- experiments

    def flip_counts(self, pos: torch.Tensor, max_units: int) -> torch.Tensor:
        flips = torch.full((self.batch,), math.inf, dtype=torch.float32, device=self.device)
        active = torch.arange(self.batch, device=self.device)
        if self.expand is None:
            self._probe()
        # expanded rows are cheap next to the layers below: start with wider prefix windows
        k0, width = 1, (EXPANDED_FIRST_WINDOW if self.expand else 1)
        while active.numel() and k0 <= max_units:
            w = min(width, max_units - k0 + 1, max(1, self.batch_size // active.numel()))
            rows_ex = active.repeat_interleave(w)
            rows_k = torch.arange(k0, k0 + w, device=self.device).repeat(active.numel())

            def mask_fn(chunk: slice) -> torch.Tensor:
                return pos[rows_ex[chunk]] < rows_k[chunk, None]  # noqa: B023 (called in this iteration)

            labels = self.run(rows_ex, mask_fn).argmax(1)
            changed = (labels != self.labels[rows_ex]).view(active.numel(), w)
            hit = changed.any(1)
            first = changed.float().argmax(1)  # index of the first True
            flips[active[hit]] = (k0 + first[hit]).float()
            active = active[~hit]
            k0 += w
            width *= 2
        return flips

    def at_k(self, pos_list: Sequence[torch.Tensor], ks: Sequence[int], keep: bool) -> torch.Tensor:
        """Scores for every (ranking, example, k): (R, B, n_k, classes). Rows run ordered by example."""
        R, B, K = len(pos_list), self.batch, len(ks)
        pos_all = torch.stack(list(pos_list))  # (R, B, n)
        grid = torch.arange(B * R * K, device=self.device)
        rows_ex = grid // (R * K)
        rows_r = (grid // K) % R
        rows_k = torch.as_tensor(list(ks), device=self.device)[grid % K]

        def mask_fn(chunk: slice) -> torch.Tensor:
            p = pos_all[rows_r[chunk], rows_ex[chunk]]
            k = rows_k[chunk, None]
            return p >= k if keep else p < k

        scores = self.run(rows_ex, mask_fn)
        return scores.view(B, R, K, -1).transpose(0, 1)


def _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
             batch_size, expand_at_layer) -> _Session:
    return _Session(model, inputs, layer, mode=mode, values=values, units=units, baselines=baselines,
                    additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                    batch_size=batch_size, expand_at_layer=expand_at_layer)


# --------------------------------------------------------------------------------------------
# flip counts


@contextlib.contextmanager
def _counting(s: _Session, progress: Optional[bool], what: str, total: Optional[int] = None) -> Iterator[None]:
    """A bar counting the ablated rows ``s`` evaluates in this block (see :class:`Progress`)."""
    with Progress(progress, total, f"{what} of {s.ref.name}", "rows") as bar:
        s.bar = bar
        try:
            yield
        finally:
            s.bar = None
