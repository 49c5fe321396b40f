"""The public :func:`aggregate` verb: :func:`conductance.layer_importance` batch after batch into running
statistics."""

from __future__ import annotations

import math
import numbers
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import ConductanceError, warn
from ..layers import LayerSpec, resolve_layers
from ..measures import MEASURES, POINT_MEASURES
from ..progress import check_progress
from .checkpoint import (
    _NOT_FINGERPRINTED,
    _batch_hash,
    _check_writable,
    _describe,
    _length,
    _mismatch,
    _model_hash,
    _other_world,
)
from .data import _distributed_sampler_check, _model_device, _plan_batches, _predicted, _to, split_batch
from .distributed import DEFAULT_TIMEOUT_MINUTES, _all_reduce, _check_timeout, _dist_state, _gather, _raise_collectively
from .files import _read_results, _unreadable, _write_results
from .result import ALL, BY, IMPORTANCE_KWARGS, AggregateResult, _accumulate

# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar in examples (examples/second shown) or, without tqdm, a line every 10 s."""

    def __init__(self, enabled: Optional[bool], total: Optional[int], initial: int, desc: str):
        self.bar, self.plain = None, False
        if enabled is None:
            enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.plain = True
            self.n, self.start, self.last, self.initial, self.total, self.desc = initial, time.perf_counter(), 0.0, \
                initial, total, desc
            return
        # whole examples: unit_scale would print "8.00/64.0"
        self.bar = tqdm(total=total, initial=initial, unit="ex", desc=desc, dynamic_ncols=True,
                        smoothing=0.1)

    def update(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.plain:
            self.n += n
            now = time.perf_counter()
            if now - self.last > 10:
                self.last = now
                rate = (self.n - self.initial) / max(now - self.start, 1e-9)
                print(f"{self.desc}: {self.n}{'/' + str(self.total) if self.total else ''} examples, "
                      f"{rate:.1f} examples/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# The verb
# ----------------------------------------------------------------------------------------------

def _target_spec(target: Any) -> str:
    if isinstance(target, str):
        if target not in ("label", "predicted"):
            raise ConductanceError(f"target must be 'label', 'predicted', a class index, None or a callable; "
                                   f"got {target!r}")
        return target
    if target is None:
        return "default"
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return f"class {int(target)}"
    if callable(target):
        return _describe(target)
    raise ConductanceError(f"target must be 'label', 'predicted', a class index, None or a callable; got "
                           f"{type(target).__name__}. (Per-example targets come from the labels: target='label')")


def aggregate(model: nn.Module, data: Iterable, layers: Union[LayerSpec, Sequence[LayerSpec]], *,
              measure: Union[str, Sequence[str]] = "conductance", by: Optional[str] = "class",
              units: str = "channel", target: Any = "label", near_zero: float = 0.01,
              checkpoint: Optional[str] = None, checkpoint_every: int = 10, progress: Optional[bool] = None,
              distributed: Optional[bool] = None, limit_batches: Optional[int] = None,
              class_names: Optional[Sequence[str]] = None, timeout: float = DEFAULT_TIMEOUT_MINUTES,
              **importance_kwargs: Any
              ) -> Union[AggregateResult, dict[str, AggregateResult]]:
    """Statistics of the importance of every unit of ``layers`` over all examples of ``data``.

    Parameters
    ----------
    model : nn.Module
        In ``eval()`` mode. Inputs and labels are moved to the device of its first parameter.
    data : iterable of batches
        A ``DataLoader`` in practice, iterated once (plus batch 0 again on resume). Batches are
        ``(inputs, labels, ...)``, ``inputs`` alone, or ``{"inputs": ..., "labels": ...}``. The
        order must be deterministic for checkpoints and for torch.distributed.
    layers : names or modules, as for :func:`conductance.layer_importance`.
    measure : str or list of str
        Any measure of :func:`~conductance.layer_importance`; a list gives a dict
        measure -> result, all from one pass over the data (path measures share the path run).
    by : {"class", "label", "predicted", None}
        Groups. ``"class"``: the label when batches have labels, else the predicted class (the
        result's ``grouping`` says which); ``"label"`` requires labels; ``"predicted"``: the model's
        top class; None: all examples in one group.
    units : {"channel", "neuron"}
        As in :func:`~conductance.layer_importance` (default here: channels).
    target : "label", "predicted", int, None or callable
        The output explained. ``"label"``: each example's label logit, or the predicted class when
        batches have no labels; ``"predicted"``: the top logit (the paper's choice); an int: that
        class for every example; None / callable: as in ``layer_importance``.
    near_zero : float
        A value ``v`` with ``|v| <= near_zero`` counts as near zero, above as positive, below
        ``-near_zero`` as negative (in the measure's units: for conductance, the output's).
    checkpoint : str, optional
        File to write the statistics, the position in the data and a fingerprint of settings
        and data to, atomically, every ``checkpoint_every`` computed batches and at the end.
        When it exists, the run resumes from it (see docs/aggregate.md); under torch.distributed
        each rank uses ``checkpoint + ".rank{r}"``.
    progress : bool, optional
        A progress bar (tqdm, examples/second) on stderr; default only when stderr is a terminal
        (and only on rank 0).
    distributed : bool, optional
        None: shard when torch.distributed is initialised; True: initialise it from torchrun's
        environment if needed; False: never. Rank ``r`` of ``W`` computes batches ``r, r + W, ...``
        and every rank returns the all-reduced (summed) result.
    limit_batches : int, optional
        Use only the first ``limit_batches`` batches of the data.
    class_names : list of str, optional
        Names shown for the classes by :meth:`AggregateResult.summary` and ``conductance show``.
    timeout : float
        Minutes a rank waits for the others in a collective before it fails with an error naming
        itself (default 30), when aggregate initialises torch.distributed (``distributed=True``);
        a process group you initialise yourself keeps the timeout you gave it.
    **importance_kwargs
        ``n_steps``, ``tolerance``, ``method``, ``max_steps``, ``baselines``,
        ``internal_batch_size``, ``attribute_to_layer_input``, ``additional_forward_args``,
        ``forward_kwargs``, ``memory_budget``, ``channels_last``: passed to ``layer_importance`` for
        every batch (so they must not depend on the batch); checked once, before any batch runs.

    Returns
    -------
    AggregateResult, or dict measure -> AggregateResult for a list of measures.
    """
    from ..attribute import UNITS, WARN_RELATIVE_ERROR, layer_importance
    from ..request import Request

    # ---- check the request --------------------------------------------------------------------
    measures = [measure] if isinstance(measure, str) else list(measure)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures or len(set(measures)) != len(measures):
        raise ConductanceError(f"measure must be one of {MEASURES} or a list of distinct ones; got {measure!r}")
    if by not in BY:
        raise ConductanceError(f"by must be 'class', 'label', 'predicted' or None; got {by!r}")
    if units not in UNITS:
        raise ConductanceError(f"unknown units {units!r}; choose 'channel' or 'neuron'")
    target_spec = _target_spec(target)
    if not isinstance(near_zero, numbers.Real) or not near_zero >= 0:
        raise ConductanceError(f"near_zero must be a number >= 0, got {near_zero!r}")
    if not isinstance(checkpoint_every, numbers.Integral) or checkpoint_every < 1:
        raise ConductanceError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if limit_batches is not None and (not isinstance(limit_batches, numbers.Integral) or limit_batches < 1):
        raise ConductanceError(f"limit_batches must be an integer >= 1, got {limit_batches!r}")
    check_progress(progress)
    bad = [k for k in importance_kwargs if k not in IMPORTANCE_KWARGS]
    if bad:
        raise TypeError(f"aggregate() got unexpected keyword argument(s) {bad}; it passes on only "
                        f"{list(IMPORTANCE_KWARGS)} to layer_importance (target, units and measure are its own)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(data, (torch.Tensor, dict)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches (a DataLoader, or a list of (inputs, labels)); "
                        f"got a {type(data).__name__}. For one batch of tensors pass [(inputs, labels)]")
    refs = resolve_layers(model, layers, use_input=bool(importance_kwargs.get("attribute_to_layer_input")))
    names = [r.name for r in refs]
    # the per-batch settings, checked once here (the baselines are checked against each batch's inputs)
    request = Request.make(units=units, **{k: v for k, v in importance_kwargs.items() if k != "baselines"})
    method, n_steps, tolerance = request.method, request.n_steps, request.tolerance
    error_threshold = tolerance if method == "adaptive" else WARN_RELATIVE_ERROR
    _check_timeout(timeout)
    active, rank, world = _dist_state(distributed, timeout)
    presharded = _distributed_sampler_check(data, world, active)
    mine = (lambda i: True) if presharded or not active else (lambda i: i % world == rank)
    device = _model_device(model)
    # what the values depend on (internal_batch_size only bounds memory: a resume may change it)
    settings = dict(method=method, n_steps=n_steps, tolerance=tolerance,
                    **{k: _describe(v) for k, v in sorted(importance_kwargs.items())
                       if k not in ("method", "n_steps", "tolerance") + _NOT_FINGERPRINTED})
    # hashing the weights costs a pass over them: only when a checkpoint or other ranks need it
    model_id = type(model).__name__ + (f":{_model_hash(model)}" if checkpoint is not None or active else "")
    fingerprint = dict(
        model=model_id, layers=names, measures=measures, units=units,
        by=by, target=target_spec, near_zero=float(near_zero),
        settings=settings,
        world_size=world, rank=rank, sharding="sampler" if presharded else "strided",
        data_batches=_length(data), data_examples=_length(getattr(data, "dataset", None)))

    # ---- the checkpoint -----------------------------------------------------------------------
    path = None
    if checkpoint is not None:
        path = os.fspath(checkpoint) + (f".rank{rank}" if active and world > 1 else "")
    loaded: Optional[dict[str, AggregateResult]] = None
    saved: dict = {}
    problem: Optional[str] = None
    if path is not None:
        problem = _check_writable(path) or _other_world(os.fspath(checkpoint), path, world)
    if path is not None and problem is None and os.path.exists(path):
        try:
            loaded, meta = _read_results(path)
            saved = meta.get("checkpoint")
            if not isinstance(saved, dict):
                raise ConductanceError(f"{path} is a saved result, not a checkpoint of aggregate(); give "
                                       "another checkpoint path")
            diff = _mismatch(saved["fingerprint"], fingerprint)
            if diff:
                raise ConductanceError(f"checkpoint {path} was written by a different run: " + "; ".join(diff)
                                       + ". Resume with the same arguments and data, or give another checkpoint "
                                       "path (the file was left unchanged)")
            if limit_batches is not None and saved["position"] > limit_batches:
                raise ConductanceError(f"checkpoint {path} already covers {saved['position']} batches, more than "
                                       f"limit_batches={limit_batches}; raise the limit or use another path")
            if set(loaded) != set(measures):
                raise ConductanceError(f"checkpoint {path} holds measures {sorted(loaded)}, not {measures}")
        except ConductanceError as exc:
            problem, loaded, saved = str(exc), None, {}
        except (KeyError, TypeError, AttributeError) as exc:
            problem, loaded, saved = str(_unreadable(path, f"incomplete checkpoint record: {exc!r}")), None, {}
    position = int(saved.get("position", 0))
    exhausted = bool(saved.get("exhausted", False))
    stop = limit_batches if limit_batches is not None else math.inf

    def wanted(i: int) -> bool:
        return mine(i) and position <= i < stop and not exhausted

    meta_common = dict(units=units, near_zero=float(near_zero), error_threshold=error_threshold,
                       model=type(model).__name__, class_names=class_names)

    def settings_of(m: str) -> dict:     # the point measures use no path (layer_importance reports "none")
        return dict(settings, method="none", n_steps=None, tolerance=None) if m in POINT_MEASURES else settings

    results: Optional[dict[str, AggregateResult]] = loaded
    grouping: Optional[str] = next(iter(loaded.values())).grouping if loaded else None

    rescued: list[str] = []

    def write_checkpoint(next_position: int, done: bool) -> None:
        if path is None or results is None:
            return
        info = dict(position=next_position, exhausted=done, fingerprint=fingerprint, rank=rank, world_size=world)
        try:
            _write_results(path, [results[m] for m in measures], {"checkpoint": info})
        except OSError as exc:
            # finished work is never lost to an output error: write it where it can be written
            rescue = os.path.join(tempfile.gettempdir(), f"conductance-rescue-{os.getpid()}-{os.path.basename(path)}")
            try:
                _write_results(rescue, [results[m] for m in measures], {"checkpoint": info})
                where = f"wrote it to {rescue} instead (move it to {path} to resume from it)"
            except OSError as exc2:
                where = f"nor to {rescue} ({exc2}); the statistics exist only in the returned result"
            if where not in rescued:
                rescued.append(where)
                warn(f"could not write the checkpoint {path} ({type(exc).__name__}: {exc}); {where}")

    # ---- the pass over the data ---------------------------------------------------------------
    pairs, sizes = _plan_batches(data, wanted)
    total = None
    if sizes is not None:
        total = sum(s for i, s in enumerate(sizes) if mine(i) and i < stop)
    elif fingerprint["data_examples"] is not None and limit_batches is None:
        total = -(-fingerprint["data_examples"] // (1 if presharded else world))
    done_examples = next(iter(loaded.values())).n_examples if loaded else 0
    bar = _Progress(progress if rank == 0 else False, total, done_examples,
                    f"{'+'.join(measures)}" + (f" rank {rank}/{world}" if active else ""))
    caught_warnings: dict[str, list] = {}
    since_write, computed, last_seen, ran_out, resumed_done = 0, 0, -1, False, False
    try:
        for i, batch in pairs:
            last_seen = i
            if i >= stop:
                break
            inputs, labels = split_batch(batch, i)
            if i == 0:
                fingerprint["first_batch"] = _batch_hash(inputs, labels)
                if problem is None and saved and saved["fingerprint"].get("first_batch") != \
                        fingerprint["first_batch"]:
                    problem = (f"checkpoint {path} was written by a different run: "
                               + "; ".join(_mismatch(saved["fingerprint"], fingerprint))
                               + ". The data must come in the same, deterministic order (no unseeded shuffling) "
                               "to resume; or give another checkpoint path (the file was left unchanged)")
                if active and not presharded and problem is None:
                    prints = _gather((fingerprint["first_batch"], fingerprint["model"]))
                    if len({p[0] for p in prints}) > 1:
                        problem = ("the first batch differs between ranks: every rank must iterate the same data "
                                   "in the same order (seed any shuffling identically, e.g. a torch.Generator "
                                   "with a fixed seed)")
                    elif len({p[1] for p in prints}) > 1:
                        problem = "the model's weights differ between ranks: load the same weights on every rank"
                _raise_collectively(problem, active)
                if exhausted or position >= stop:
                    resumed_done = True
                    break
            if not wanted(i):
                continue
            x = inputs.to(device)
            y = _to(labels, device)
            has_labels = y is not None
            kind = ("label" if has_labels else "predicted") if by == "class" else ALL if by is None else by
            if by == "label" and not has_labels:
                raise ConductanceError(f"by='label' but batch {i} has no labels; use by='predicted' or 'class'")
            if grouping is None:
                grouping = kind
            elif kind != grouping:
                raise ConductanceError(f"batch {i} {'has' if has_labels else 'has no'} labels but earlier batches "
                                       f"{'did not' if has_labels else 'did'}: every batch must have labels, or none")
            if target_spec == "label":
                t = y if has_labels else None
            elif target_spec == "predicted":
                t = None
            else:
                t = target
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = layer_importance(model, x, names, measures, target=t, units=units, **importance_kwargs)
                except ConductanceError as exc:
                    raise ConductanceError(f"batch {i}: {exc}") from exc
            for w in caught:
                caught_warnings.setdefault(str(w.message)[:60], [str(w.message), 0])[1] += 1
            _check_finite_batch(out, measures, names, i)
            first = out[measures[0]]
            if grouping == "label":
                groups = y
            elif grouping == "predicted":
                groups = first.target if t is None and first.target is not None else \
                    _predicted(model, x, importance_kwargs, i)
            else:
                groups = torch.zeros(x.shape[0], dtype=torch.long)
            groups = groups.detach().to("cpu", torch.long)
            if results is None:
                target_name = "predicted" if target_spec == "label" and not has_labels else target_spec
                results = {m: AggregateResult.empty(0, {n: tuple(out[m][n].shape[1:]) for n in names},
                                                    measure=m, layers=names, grouping=grouping,
                                                    is_cut=dict(out[m].is_cut), target=target_name,
                                                    settings=settings_of(m), **meta_common)
                           for m in measures}
            for m in measures:
                _accumulate(results[m], out[m], groups, names, float(near_zero), error_threshold)
            computed += 1
            since_write += 1
            bar.update(int(x.shape[0]))
            if since_write >= checkpoint_every:
                write_checkpoint(i + 1, False)
                since_write = 0
        else:
            ran_out = True
    finally:
        bar.close()
    if last_seen < 0:
        _raise_collectively(problem or "the data yielded no batches", active)
    if not resumed_done:
        # where the data ends, if known: the DataLoader's batch count, or the last batch read
        n_total = len(sizes) if sizes is not None else (last_seen + 1 if ran_out else None)
        if n_total is not None and n_total <= stop:
            next_position, exhausted = n_total, True
        else:
            next_position, exhausted = int(stop), False
        if computed or next_position != position or exhausted != bool(saved.get("exhausted", False)):
            write_checkpoint(next_position, exhausted)
    for message, count in caught_warnings.values():
        warn(message if count == 1 else f"{message} [and similar warnings in {count - 1} more batches]")

    # ---- combine ranks ------------------------------------------------------------------------
    if active:
        local = None if results is None else {m: (r._meta(), r.n_groups) for m, r in results.items()}
        gathered = [g for g in _gather(local) if g is not None]
        if not gathered:
            raise ConductanceError("no rank computed any batch: the data is empty (or limit_batches is 0)")
        if results is None:
            results = {}
            for m in measures:
                meta = dict(gathered[0][m][0])
                shapes = meta.pop("unit_shapes")
                meta.pop("n_batches")
                results[m] = AggregateResult.empty(0, {k: tuple(v) for k, v in shapes.items()}, **meta)
        _all_reduce([results[m] for m in measures])
    if results is None:
        raise ConductanceError("no batch was aggregated: the data is empty")
    for r in results.values():
        r.bind(model)          # result.mean(model.layer) as well as result.mean("layer")
    return results[measures[0]] if isinstance(measure, str) else {m: results[m] for m in measures}


def _check_finite_batch(out: dict, measures: Sequence[str], names: Sequence[str], index: int) -> None:
    """Refuse a batch whose values are NaN or Inf: it would turn every mean it enters into NaN."""
    for m in measures:
        parts = {"F(x) - F(x')": out[m].output_diff, **{f"layer {n!r}": out[m][n] for n in names}}
        for what, t in parts.items():
            finite = torch.isfinite(t.detach().reshape(t.shape[0], -1)).all(1) if t.dim() else torch.isfinite(t)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten()[:10].tolist()
                raise ConductanceError(f"batch {index}: {m} of {what} is NaN or Inf for examples {bad} of the batch; "
                                       "the model produces non-finite values for them. Fix the model or leave those "
                                       "examples out; nothing of this batch was added")
