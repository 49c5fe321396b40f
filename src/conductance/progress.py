"""A progress bar for long calls: tqdm when it is installed and a terminal is attached."""

from __future__ import annotations

import sys
from typing import Any, Optional

from .errors import ConductanceError


def check_progress(progress: Any) -> None:
    """ConductanceError unless ``progress`` is True, False or None (checked before any work).

    Parameters
    ----------
    progress : Any
    """
    if progress is not None and not isinstance(progress, bool):
        raise ConductanceError(f"progress must be True, False or None (a bar when stderr is a terminal), "
                               f"got {progress!r}")


class Progress:
    """Counts whole items (points, examples, rows) on stderr; does nothing when disabled.

    ``total`` None: a count without a percentage (work whose size is known only at the end).

    ``enabled``: True, False, or None (default) for "when stderr is a terminal". With
    ``enabled=True`` and no tqdm installed, a ConductanceError says how to get it.
    """

    def __init__(self, enabled: Optional[bool], total: Optional[int], desc: str, unit: str):
        check_progress(enabled)
        self.bar: Any = None
        if enabled is None:
            enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
            try:
                import tqdm  # noqa: F401
            except ImportError:
                enabled = False
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ConductanceError("progress=True needs tqdm: pip install tqdm (or pip install "
                                   "'conductance[progress]')") from None
        # integer counts: no unit scaling, which would print "8.00/64.0"
        self.bar = tqdm(total=None if total is None else int(total), desc=desc, unit=f" {unit}", unit_scale=False,
                        dynamic_ncols=True, leave=True, file=sys.stderr)

    def update(self, n: int) -> None:
        """Advance the bar by ``n`` (nothing when no bar is shown).

        Parameters
        ----------
        n : int
        """
        if self.bar is not None:
            self.bar.update(int(n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
