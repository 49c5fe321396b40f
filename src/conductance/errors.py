"""Exceptions and warnings raised by conductance."""


class ConductanceError(ValueError):
    """A problem with what was asked for (a layer, a target, the inputs); the message says how to fix it."""


class ConductanceWarning(UserWarning):
    """A result that is valid but may not be what the user wants (low accuracy, training mode)."""
