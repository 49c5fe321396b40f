"""The settings of one attribution call, checked once and carried through the engine.

A public function (``layer_conductance``, ``layer_importance``, ``neuron_conductance``, ...) takes
its settings as keywords, turns them into one :class:`Request` with :meth:`Request.make` (every
check runs there, before the model runs) and hands that object to the internal functions, which
read it and never check it again.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

from . import engine
from .adaptive import REFINE_SHARE
from .errors import ConductanceError
from .forward_args import check_forward_args
from .inputs import check_budget, check_steps
from .paths import METHODS
from .progress import check_progress

#: Relative error the adaptive default aims for, per unit (the L2 distance of each layer's vector of
#: unit values to the exact integral) and in completeness on cut layers.
DEFAULT_TOLERANCE = 0.02
#: Default budget of path points per example for the adaptive rule.
DEFAULT_MAX_STEPS = 256
#: Pairs (interval and midpoint) of the adaptive rule's starting grid: 2 * 8 + 1 = 17 points.
ADAPTIVE_INITIAL_STEPS = 8
UNITS = ("neuron", "channel")
#: The public keywords :meth:`Request.make` takes (the settings a call forwards to the engine).
KEYWORDS = ("method", "n_steps", "tolerance", "max_steps", "units", "internal_batch_size", "additional_forward_args",
            "forward_kwargs", "attribute_to_layer_input", "memory_budget", "channels_last", "progress")


def resolve_method(method: Optional[str], n_steps: Optional[int], tolerance: Optional[float]
                   ) -> tuple[str, Optional[int], Optional[float]]:
    """Settle (method, n_steps, tolerance) from what the user gave.

    Neither ``n_steps`` nor ``tolerance``: adaptive to ``DEFAULT_TOLERANCE``. ``tolerance``:
    adaptive. ``n_steps`` alone: the trapezoid rule on Gauss-Legendre nodes plus both ends.

    Parameters
    ----------
    method : str or None
        A name from :data:`conductance.paths.METHODS`, or None to choose from the other two.
    n_steps : int or None
    tolerance : float or None
        Relative completeness error the adaptive rule aims at.

    Returns
    -------
    method : str
    n_steps : int or None
    tolerance : float or None
    """
    if method is not None and method not in METHODS:
        raise ConductanceError(f"unknown method {method!r}; choose one of {METHODS}. Captum's names "
                               "riemann_left/right/middle/trapezoid give Captum's numbers; Captum's "
                               "'gausslegendre' is method='captum' here, while our 'gausslegendre' is the "
                               "trapezoid rule on Gauss-Legendre nodes plus both ends of the path")
    if tolerance is not None:
        if method not in (None, "adaptive"):
            raise ConductanceError(f"tolerance is met by refining the path, which method={method!r} does "
                                   "not do; drop method or use method='adaptive'")
        return "adaptive", n_steps, float(tolerance)
    if method == "adaptive" or (method is None and n_steps is None):
        return "adaptive", n_steps, DEFAULT_TOLERANCE
    if method is None:
        method = "gausslegendre"
    return method, 50 if n_steps is None else n_steps, None


def check_units(units: Any) -> str:
    """Check the ``units`` setting.

    Parameters
    ----------
    units : Any
        ``"neuron"`` or ``"channel"``.

    Returns
    -------
    str
        ``units`` unchanged; anything else raises a ConductanceError.
    """
    if units not in UNITS:
        raise ConductanceError(f"unknown units {units!r}; choose 'neuron' (the layer's own shape) or "
                               "'channel' (summed over every dimension after the channel dimension)")
    return units


def check_internal_batch_size(internal_batch_size: Any) -> Optional[int]:
    """Check the ``internal_batch_size`` setting (path points per forward pass).

    Parameters
    ----------
    internal_batch_size : Any
        A positive integer, or None for the default chunking.

    Returns
    -------
    int or None
    """
    if internal_batch_size is not None and (not isinstance(internal_batch_size, numbers.Integral)
                                            or isinstance(internal_batch_size, bool) or internal_batch_size < 1):
        raise ConductanceError(f"internal_batch_size must be a positive integer, got {internal_batch_size!r}")
    return None if internal_batch_size is None else int(internal_batch_size)


def check_memory_budget(memory_budget: Any) -> int:
    """Bytes the adaptive rule may keep in stored points; None: ``engine.ADAPTIVE_STORE_BYTES`` (3 GiB).

    Parameters
    ----------
    memory_budget : Any
        A positive integer number of bytes, or None.

    Returns
    -------
    int
        Bytes.
    """
    if memory_budget is None:
        return int(engine.ADAPTIVE_STORE_BYTES)
    if not isinstance(memory_budget, numbers.Integral) or isinstance(memory_budget, bool) or memory_budget < 1:
        raise ConductanceError(f"memory_budget must be a positive integer number of bytes (e.g. 8 * 2**30 for "
                               f"8 GiB) or None for the default {engine.ADAPTIVE_STORE_BYTES}; got "
                               f"{memory_budget!r}")
    return int(memory_budget)


def check_channels_last(channels_last: Any) -> Optional[bool]:
    """Check the ``channels_last`` setting.

    Parameters
    ----------
    channels_last : Any
        None (automatic), True or False.

    Returns
    -------
    bool or None
    """
    if channels_last is not None and not isinstance(channels_last, bool):
        raise ConductanceError(f"channels_last must be None (automatic: channels-last path points for a "
                               f"convolutional model with 4-D inputs on the CPU), True or False; got "
                               f"{channels_last!r}")
    return channels_last


@dataclass(frozen=True, eq=False)
class Request:
    """Every setting of one call, resolved and checked (build it with :meth:`make`).

    Attributes
    ----------
    method : the rule (``"adaptive"`` or a fixed rule of :data:`conductance.paths.METHODS`).
    n_steps : intervals of a fixed rule, or pairs of the adaptive rule's starting grid (None: default).
    tolerance : the adaptive rule's target; None for a fixed rule.
    max_steps : the adaptive rule's budget of path points per example.
    units : ``"neuron"`` or ``"channel"``.
    internal_batch_size : path points per forward/backward pass (None: chosen from the input size).
    additional_forward_args : tuple, forward_kwargs : dict
        What the model gets after the inputs, in the engine's forms.
    attribute_to_layer_input : observe each layer's input instead of its output.
    memory_budget : bytes the adaptive rule may keep in stored points.
    channels_last : None (automatic), True or False: the layout of 4-D path points.
    refine_share : each adaptive round bisects an example's worst pairs up to this share of its score.
    unit_floor : conductance values are measured against ``max(||values||, unit_floor * |F(x) - F(x')|)``.
    progress : a bar counting path points (True, False, or None: when stderr is a terminal).
    """

    method: str
    n_steps: Optional[int]
    tolerance: Optional[float]
    max_steps: int = DEFAULT_MAX_STEPS
    units: str = "neuron"
    internal_batch_size: Optional[int] = None
    additional_forward_args: tuple = ()
    forward_kwargs: dict = field(default_factory=dict)
    attribute_to_layer_input: bool = False
    memory_budget: int = engine.ADAPTIVE_STORE_BYTES
    channels_last: Optional[bool] = None
    refine_share: float = REFINE_SHARE
    unit_floor: float = engine.UNIT_ERROR_FLOOR
    progress: Optional[bool] = False

    @classmethod
    def make(cls, *, method: Optional[str] = None, n_steps: Optional[int] = None,
             tolerance: Optional[float] = None, max_steps: int = DEFAULT_MAX_STEPS, units: str = "neuron",
             internal_batch_size: Optional[int] = None, additional_forward_args: Any = None,
             forward_kwargs: Optional[dict] = None, attribute_to_layer_input: bool = False,
             memory_budget: Optional[int] = None, channels_last: Optional[bool] = None,
             progress: Optional[bool] = False) -> Request:
        """Check the user's settings and settle the rule; raises ConductanceError naming the bad argument.

        Nothing here runs the model, so every bad setting is refused before the first forward pass.

        Parameters
        ----------
        method, n_steps, tolerance, max_steps, units, internal_batch_size, additional_forward_args, forward_kwargs,
        attribute_to_layer_input, memory_budget, channels_last, progress
            As in :func:`conductance.layer_conductance`.

        Returns
        -------
        Request
            Frozen; ``method`` settled by :func:`resolve_method`.
        """
        check_units(units)
        check_progress(progress)
        check_steps(n_steps, tolerance, max_steps)
        method, n_steps, tolerance = resolve_method(method, n_steps, tolerance)
        check_budget(method, n_steps, max_steps, DEFAULT_MAX_STEPS)
        extra, kwargs = check_forward_args(additional_forward_args, forward_kwargs)
        return cls(method=method, n_steps=n_steps, tolerance=tolerance, max_steps=int(max_steps), units=units,
                   internal_batch_size=check_internal_batch_size(internal_batch_size),
                   additional_forward_args=extra, forward_kwargs=kwargs,
                   attribute_to_layer_input=bool(attribute_to_layer_input),
                   memory_budget=check_memory_budget(memory_budget),
                   channels_last=check_channels_last(channels_last), progress=progress)

    @property
    def fixed_steps(self) -> int:
        """Intervals of the fixed rule (``resolve_method`` always sets them for a fixed rule)."""
        if self.n_steps is None:
            raise ConductanceError(f"method={self.method!r} needs n_steps")
        return self.n_steps

    @property
    def target_tolerance(self) -> float:
        """The adaptive rule's tolerance (``resolve_method`` always sets it for the adaptive rule)."""
        if self.tolerance is None:
            raise ConductanceError("the adaptive rule needs a tolerance")
        return self.tolerance

    @property
    def initial_steps(self) -> int:
        """Pairs of the adaptive rule's starting grid."""
        return self.n_steps or ADAPTIVE_INITIAL_STEPS


__all__ = ["ADAPTIVE_INITIAL_STEPS", "DEFAULT_MAX_STEPS", "DEFAULT_TOLERANCE", "KEYWORDS", "UNITS", "Request",
           "resolve_method"]
