"""conductance: how important is each hidden unit of a PyTorch network?

Implements conductance (Dhamdhere, Sundararajan, Yan, "How Important Is a Neuron?", 2018):
the flow of integrated-gradients attribution through a hidden unit.
"""

from .attribute import layer_conductance, layer_importance
from .errors import ConductanceError, ConductanceWarning
from .neuron import neuron_conductance
from .result import LayerResult
from . import reference

__all__ = ["layer_conductance", "layer_importance", "neuron_conductance", "LayerResult", "ConductanceError",
           "ConductanceWarning", "reference"]
__version__ = "0.1.0"
from .selection import FeatureSelectionResult, feature_selection  # noqa: E402
__all__ += ["feature_selection", "FeatureSelectionResult"]
from .aggregate import AggregateResult, aggregate  # noqa: E402  dataset-level statistics (issue 5)
__all__ += ["aggregate", "AggregateResult"]
from .ablation import (AblationCurve, AblationSummary, ablate, ablation_summary, compare_rankings,  # noqa: E402
                       deletion_curve, flip_count, flipped_by_top_k, insertion_curve, layer_mean, layer_values)
__all__ += ["ablate", "layer_values", "layer_mean", "flip_count", "flipped_by_top_k", "deletion_curve",
            "insertion_curve", "ablation_summary", "compare_rankings", "AblationCurve", "AblationSummary"]
