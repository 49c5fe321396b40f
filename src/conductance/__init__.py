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
