"""Importance of hidden units over a whole data set: streaming, resumable, on one process or many.

:func:`aggregate` runs :func:`conductance.layer_importance` batch after batch and keeps, per group
(class) and per unit, only mergeable statistics in float64 / int64: count, sum, sum of squared
deviations from the mean, and the counts of positive, negative and near-zero values, plus a
summary of each layer's completeness error. Sums and counts add up across batches, files
(:meth:`AggregateResult.merge`) and processes (``torch.distributed.all_reduce``); squared
deviations are merged with Chan et al.'s pairwise update (so a standard deviation far below the
mean stays exact), and the result does not depend on how the data was split, up to the order of
float64 operations.

Batches may be ``(inputs, labels)`` (a tuple or list; items after the second are ignored),
``inputs`` alone (a tensor, or a one-item tuple / list), or a dict with the key ``"inputs"`` and
optionally ``"labels"``.

The package holds one concept per module: :mod:`.result` (the statistics), :mod:`.files` (the file
layout), :mod:`.checkpoint` (resuming), :mod:`.data` (batches), :mod:`.distributed` (torchrun) and
:mod:`.api` (:func:`aggregate` itself).
"""

from .api import _Progress, aggregate  # noqa: F401  (_Progress: used by the tests)
from .checkpoint import checkpoint_info
from .data import split_batch
from .distributed import DEFAULT_TIMEOUT_MINUTES, init_distributed

# the private names stay importable from here for the tests and the benchmark that use them
from .files import _read_results, _write_results, read_results, write_results  # noqa: F401
from .result import ALL, BY, CHECKSUM, FORMAT, IMPORTANCE_KWARGS, AggregateResult, TopUnit

__all__ = ["ALL", "BY", "CHECKSUM", "DEFAULT_TIMEOUT_MINUTES", "FORMAT", "IMPORTANCE_KWARGS", "AggregateResult",
           "TopUnit", "aggregate", "checkpoint_info", "init_distributed", "read_results", "split_batch",
           "write_results"]
