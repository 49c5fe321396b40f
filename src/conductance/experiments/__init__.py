"""Reproductions of the paper's experiments on real networks and data, written as HTML reports.

Each experiment package (``image``, ``text``, ``transformer``, ``knowledge_neurons``, ``pruning``; each
of modules ``config``, ``compute`` and ``sections``) exposes
``run(report: Report, *, quick: bool, **options)``, which adds its sections, figures, tables and
numbers to a shared :class:`~conductance.experiments.report.Report` (and may return its numbers as
well, as ``pruning.run`` does). The command line
(``conductance reproduce ...``) chooses the experiments and writes the report after each one, so a
long run never loses a finished experiment.
"""

import os

#: What ``conductance reproduce all`` runs; ``knowledge_neurons`` and ``pruning`` run only when named
#: (docs/transformers.md and docs/pruning.md give their commands and costs).
EXPERIMENTS = ("image", "text", "transformer")


def cache_dir() -> str:
    """Where trained networks are cached: ``$CONDUCTANCE_CACHE`` or ``~/.cache/conductance`` (created).

    Returns
    -------
    str
    """
    root = os.environ.get("CONDUCTANCE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "conductance")
    os.makedirs(root, exist_ok=True)
    return root
