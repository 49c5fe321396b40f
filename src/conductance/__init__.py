"""conductance: how important is each hidden unit of a PyTorch network?

Implements conductance (Dhamdhere, Sundararajan, Yan, "How Important Is a Neuron?"
(arXiv:1805.12233, 2018; ICLR 2019)): the flow of integrated-gradients attribution through a hidden unit.
"""

from . import hf, reference, sites
from .ablation import (
                       AblationCurve,
                       AblationSummary,
                       ablate,
                       ablation_summary,
                       compare_rankings,
                       deletion_curve,
                       flip_count,
                       flipped_by_top_k,
                       insertion_curve,
                       layer_mean,
                       layer_values,
)
from .aggregate import AggregateResult, aggregate
from .attribute import layer_conductance, layer_importance
from .errors import ConductanceError, ConductanceWarning
from .forward_args import shared
from .io import load
from .neuron import neuron_conductance
from .result import LayerResult
from .selection import FeatureSelectionResult, feature_selection

__all__ = [
    # attribution
    "layer_conductance", "layer_importance", "neuron_conductance", "LayerResult", "reference",
    # transformers (token ids, heads, FFN neurons): cd.hf.layer_conductance, cd.hf.ablate_heads, ...
    "hf",
    # reading and changing layers while the model runs: sites.record, sites.intervene
    "sites",
    # data sets and selection
    "aggregate", "AggregateResult", "feature_selection", "FeatureSelectionResult",
    # ablation
    "ablate", "layer_values", "layer_mean", "flip_count", "flipped_by_top_k", "deletion_curve", "insertion_curve",
    "ablation_summary", "compare_rankings", "AblationCurve", "AblationSummary",
    # errors, and shared forward arguments
    "ConductanceError", "ConductanceWarning", "shared",
    # every result type: result.save(path), cd.load(path)
    "load",
]
__version__ = "0.1.0"
