"""Batches: splitting a batch into inputs and labels, planning which batches a rank takes, predicted-class groups."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConductanceError
from .checkpoint import _length

# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------

def split_batch(batch: Any, index: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(inputs, labels or None)`` from one batch: ``(inputs, labels, ...)``, ``inputs`` or a dict
    with ``"inputs"`` (and optionally ``"labels"``).

    Parameters
    ----------
    batch : tuple, list, dict or Tensor
        One item of the data; its inputs a Tensor (batch, ...), its labels (batch,).
    index : int
        The batch's position in the data, for the messages.

    Returns
    -------
    inputs : Tensor, shape (batch, ...)
    labels : LongTensor, shape (batch,), or None
    """
    if isinstance(batch, dict):
        if "inputs" not in batch:
            raise ConductanceError(f"batch {index} is a dict without an 'inputs' key (keys {list(batch)}); "
                                   "use {'inputs': x, 'labels': y} or yield (inputs, labels) tuples")
        inputs, labels = batch["inputs"], batch.get("labels")
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ConductanceError(f"batch {index} is empty")
        inputs, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        inputs, labels = batch, None
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"batch {index}: inputs must be a tensor (batch, ...), got {type(inputs).__name__}; "
                        "batches are (inputs, labels), inputs alone, or {'inputs': ..., 'labels': ...}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"batch {index}: labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() != inputs.shape[0]:
            raise ConductanceError(f"batch {index}: {labels.numel()} labels for {inputs.shape[0]} inputs "
                                   f"(labels shape {tuple(labels.shape)}); give one class index per example")
        labels = labels.reshape(-1).long()
        if labels.numel() and labels.min() < 0:
            raise ConductanceError(f"batch {index}: negative labels {labels[labels < 0].tolist()[:5]}; "
                                   "labels must be class indices 0, 1, ...")
    return inputs, labels


def _distributed_sampler_check(data: Any, world: int, active: bool) -> bool:
    """True when ``data`` is a DataLoader whose DistributedSampler already gives each rank its shard."""
    sampler = getattr(data, "sampler", None)
    try:
        from torch.utils.data.distributed import DistributedSampler
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(sampler, DistributedSampler):
        return False
    n, replicas = _length(sampler.dataset), sampler.num_replicas
    if n is not None and n % replicas:
        what, k = (("drops the last", n % replicas) if sampler.drop_last
                   else ("pads with repeats of the first", replicas - n % replicas))
        raise ConductanceError(
            f"the DataLoader's DistributedSampler {what} {k} example(s) ({n} examples over {replicas} "
            "replicas), so some examples would count "
            f"{'zero times' if sampler.drop_last else 'twice'}. Pass a plain DataLoader (no sampler): aggregate() "
            "gives each rank every world_size-th batch itself, with every example counted once")
    if not active or replicas != world:
        raise ConductanceError(
            f"the DataLoader's DistributedSampler splits the data over {replicas} replicas, but aggregate() "
            f"runs {'without torch.distributed' if not active else f'on {world} processes'}; pass a plain "
            "DataLoader and let aggregate() shard it")
    return True


def _plan_batches(data: Iterable, wanted: Callable[[int], bool]
                  ) -> tuple[Iterator[tuple[int, Any]], Optional[list[int]]]:
    """(index, batch) pairs to read, and the sizes of all batches when known.

    A plain ``DataLoader`` over a map-style dataset loads only batch 0 and the batches
    ``wanted(index)`` asks for (its batch sampler is listed once; other batches are never read).
    Any other iterable is read in full and the caller drops the batches it does not want.
    """
    from torch.utils.data import DataLoader, IterableDataset

    if type(data) is DataLoader and data.batch_sampler is not None and \
            not isinstance(data.dataset, IterableDataset):
        try:
            sizes, chosen, selected = [], [], []
            for i, b in enumerate(data.batch_sampler):
                sizes.append(len(b))
                if i == 0 or wanted(i):
                    chosen.append(i)
                    selected.append(list(b))
            kwargs = dict(batch_sampler=selected, num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory, timeout=data.timeout,
                          worker_init_fn=data.worker_init_fn, multiprocessing_context=data.multiprocessing_context,
                          generator=data.generator, persistent_workers=data.persistent_workers)
            if data.num_workers > 0:
                kwargs["prefetch_factor"] = data.prefetch_factor
            if getattr(data, "pin_memory_device", ""):
                kwargs["pin_memory_device"] = data.pin_memory_device
            loader = DataLoader(data.dataset, **kwargs)
        except Exception:  # an unusual loader: read it in full instead
            pass
        else:
            return zip(chosen, loader), sizes
    return enumerate(data), None


def _model_device(model: nn.Module) -> torch.device:
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def _to(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return None if t is None else t.to(device, non_blocking=True)


def _predicted(model: nn.Module, x: torch.Tensor, kwargs: dict, index: int) -> torch.Tensor:
    from ..engine import logits_of
    from ..forward_args import ForwardArgs

    args, kw = ForwardArgs.make(kwargs.get("additional_forward_args"), kwargs.get("forward_kwargs"), x.shape[0],
                                warn_ambiguous=False).at()
    with torch.no_grad():
        scores = logits_of(model(x, *args, **kw))
    if scores.dim() != 2:
        raise ConductanceError(f"batch {index}: grouping by predicted class needs outputs (batch, classes), got "
                               f"{tuple(scores.shape)}; give labels or use by=None")
    return scores.argmax(1)
