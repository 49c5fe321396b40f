"""Exceptions and warnings raised by conductance."""

import os
import sys
import warnings
from types import FrameType
from typing import Optional

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class ConductanceError(ValueError):
    """A problem with what was asked for (a layer, a target, the inputs); the message says how to fix it."""


class ConductanceWarning(UserWarning):
    """A result that is valid but may not be what the user wants (low accuracy, training mode)."""


def not_dependent(names: list) -> ConductanceError:
    """Error for layers that no gradient from the explained output reaches.

    Parameters
    ----------
    names : list of str
        Layer names.

    Returns
    -------
    ConductanceError
        To be raised by the caller.
    """
    return ConductanceError(f"the target does not depend on layer(s) {names}: no gradient flows from the "
                            "explained output back to them (is the layer after the output, or on a branch "
                            "the output does not use?); choose layers below the output you explain")


def warn(message: str) -> None:
    """Warn with a ConductanceWarning attributed to the first caller outside this package.

    Parameters
    ----------
    message : str
    """
    level = 2
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        level += 1
        frame = frame.f_back
    warnings.warn(message, ConductanceWarning, stacklevel=level)
