"""Ablation: switch hidden units off and watch the prediction.

The paper judges a ranking of units by removing them in ranking order until the
top-1 label changes (Dhamdhere et al., section on ablation). This module provides

- :func:`ablate`, a context manager that overwrites chosen units of one layer's output
  while the model runs (modes "zero", "baseline", "mean");
- :func:`layer_values` and :func:`layer_mean`, which record a layer's output (for the
  baseline activation or a dataset mean);
- :func:`flip_count`, the number of units removed cumulatively in ranking order until
  the label changes, evaluated for many prefix lengths per forward pass;
- :func:`deletion_curve` / :func:`insertion_curve`, the target logit and the top-1
  agreement as the top-k units are removed (or are the only ones kept), against random
  rankings, with the area under each curve;
- :func:`ablation_summary` and :func:`compare_rankings`, the side-by-side table the
  paper reports (mean flips, how many need more than 10, the maximum, and the share
  flipped by removing the top 10).

Units are addressed by *flat* index: for ``units="neuron"`` the row-major index into
the layer's shape without the batch dimension (as ``LayerResult.top`` reports it); for
``"channel"`` the index along dimension 1, every position of the channel ablated together.

The package holds one concept per module: :mod:`.intervene` (the context manager, values and
recordings), :mod:`.rankings` (orders of units), :mod:`.runner` (the batched session), :mod:`.flips`
(flip counts), :mod:`.curves` (deletion and insertion curves) and :mod:`.summary` (the table).
"""

from .curves import DEFAULT_CURVE_POINTS, AblationCurve, ExampleArea, deletion_curve, insertion_curve
from .flips import flip_count, flipped_by_top_k
from .intervene import MODES, UNIT_TYPES, ablate, layer_mean, layer_values
from .rankings import Ranking
from .runner import DEFAULT_ROW_ELEMENTS, EXPANDED_FIRST_WINDOW, MAX_DEFAULT_ROWS, _Session  # noqa: F401 (_Session: tests)
from .summary import AblationSummary, ablation_summary, compare_rankings

__all__ = ["DEFAULT_CURVE_POINTS", "DEFAULT_ROW_ELEMENTS", "EXPANDED_FIRST_WINDOW", "MAX_DEFAULT_ROWS", "MODES",
           "UNIT_TYPES", "AblationCurve", "AblationSummary", "ExampleArea", "Ranking", "ablate", "ablation_summary",
           "compare_rankings", "deletion_curve", "flip_count", "flipped_by_top_k", "insertion_curve", "layer_mean",
           "layer_values"]
