"""torch.distributed for :func:`conductance.aggregate`: initialisation, bounded collectives and the merge of ranks."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch

from ..errors import ConductanceError
from .result import AggregateResult

# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------

#: Minutes a rank waits in a collective (or for its peers at start-up) before it fails.
DEFAULT_TIMEOUT_MINUTES = 30.0


def init_distributed(backend: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_MINUTES) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) if not done yet.

    Parameters
    ----------
    backend : str, optional
        Default nccl when CUDA is available, else gloo.
    timeout : float
        Minutes; bounds every collective: a rank whose peer stopped or hangs fails after it
        instead of waiting for ever. It does not change a process group that is already
        initialised.

    Returns
    -------
    rank, world_size : int
    """
    import datetime

    import torch.distributed as dist

    _check_timeout(timeout)

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ConductanceError("distributed=True but torch.distributed is not initialised and no torchrun "
                                   "environment (WORLD_SIZE, RANK, MASTER_ADDR) is set; launch with torchrun or "
                                   "call torch.distributed.init_process_group first")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=float(timeout)))
    return dist.get_rank(), dist.get_world_size()


def _check_timeout(timeout: Any) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < float(timeout) < math.inf:
        raise ConductanceError(f"timeout must be a positive number of minutes (default {DEFAULT_TIMEOUT_MINUTES:g}), "
                               f"got {timeout!r}")


def _dist_state(distributed: Optional[bool], timeout: float = DEFAULT_TIMEOUT_MINUTES) -> tuple[bool, int, int]:
    import torch.distributed as dist

    available = dist.is_available()
    if distributed is False:
        return False, 0, 1
    if distributed is None:
        if available and dist.is_initialized():
            return True, dist.get_rank(), dist.get_world_size()
        return False, 0, 1
    if not available:
        raise ConductanceError("distributed=True but this torch build has no torch.distributed")
    rank, world = init_distributed(timeout=timeout)
    return True, rank, world


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(obj: Any) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    _collective(dist.all_gather_object, out, obj)
    return out


def _collective(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a torch.distributed collective; a timeout or a dead peer becomes an error naming this rank."""
    import torch.distributed as dist

    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise ConductanceError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: the collective {fn.__name__} failed or timed out "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Another rank has probably "
            "stopped or hangs (an error, a crash, a frozen data loader); see its log. The wait is bounded by the "
            "process group's timeout (aggregate(..., timeout=minutes) when aggregate initialises it)") from exc


def _raise_collectively(problem: Optional[str], active: bool) -> None:
    """Raise on every rank when any rank has a problem (so no rank waits forever for the others)."""
    if active:
        problems = [(r, p) for r, p in enumerate(_gather(problem)) if p]
        if problems:
            raise ConductanceError("; ".join(f"rank {r}: {p}" if len(problems) > 1 or r else p
                                             for r, p in problems))
    elif problem:
        raise ConductanceError(problem)


def _all_reduce(results: list[AggregateResult]) -> None:
    """Sum the statistics of every rank into every rank's results (max for the error maximum)."""
    import torch.distributed as dist

    device = _collective_device()
    size = torch.tensor([max(r.n_groups for r in results)], dtype=torch.int64, device=device)
    _collective(dist.all_reduce, size, op=dist.ReduceOp.MAX)
    for r in results:
        r._pad(int(size.item()))
    floats: list[np.ndarray] = []
    ints: list[np.ndarray] = []
    maxes: list[np.ndarray] = []
    local = [(r.counts.copy(), {layer: r.stats[layer]["sum"].copy() for layer in r.layers}) for r in results]
    for r in results:
        for k, v in r._arrays().items():
            if k.endswith(".m2"):
                continue                 # merged below, once the global means are known
            (maxes if k.endswith("error_max") else ints if v.dtype.kind in "iu" else floats).append(v)
    _reduce_arrays(floats, ints, maxes, device)
    # each rank's squared deviations about the global mean: m2_r + n_r (mean_r - mean)^2, summed
    spread = []
    for r, (n_local, sums) in zip(results, local):
        n_r = n_local.astype(np.float64)[:, None]
        n = np.maximum(r.counts.astype(np.float64)[:, None], 1)
        for layer in r.layers:
            m2 = r.stats[layer]["m2"]
            shift = np.where(n_r > 0, sums[layer] / np.maximum(n_r, 1) - r.stats[layer]["sum"] / n, 0.0)
            m2 += n_r * shift * shift
            spread.append(m2)
    _reduce_arrays(spread, [], [], device)
    batches = torch.tensor([r.n_batches for r in results], dtype=torch.int64, device=device)
    _collective(dist.all_reduce, batches)
    for r, n in zip(results, batches.cpu().tolist()):
        r.n_batches = int(n)


def _reduce_arrays(floats: list, ints: list, maxes: list, device: torch.device) -> None:
    """All-reduce numpy arrays in place: ``floats`` and ``ints`` summed, ``maxes`` by maximum."""
    import torch.distributed as dist

    for arrays, dtype, op in ((floats, torch.float64, dist.ReduceOp.SUM), (ints, torch.int64, dist.ReduceOp.SUM),
                              (maxes, torch.float64, dist.ReduceOp.MAX)):
        if not arrays:
            continue
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(
            np.float64 if dtype == torch.float64 else np.int64)).to(device)
        _collective(dist.all_reduce, flat, op=op)
        reduced = flat.cpu().numpy()
        offset = 0
        for a in arrays:
            a[...] = reduced[offset: offset + a.size].reshape(a.shape)
            offset += a.size
