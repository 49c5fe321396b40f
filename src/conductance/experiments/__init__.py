"""Reproductions of the paper's experiments on real networks and data, written as HTML reports.

Each experiment module (``image``, ``text``, ``transformer``) exposes
``run(report: Report, *, quick: bool, **options) -> None``, which adds its sections, figures,
tables and numbers to a shared :class:`~conductance.experiments.report.Report`. The command line
(``conductance reproduce ...``) chooses the experiments and writes the report after each one, so a
long run never loses a finished experiment.
"""

EXPERIMENTS = ("image", "text", "transformer")
