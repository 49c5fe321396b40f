"""Every public function of the package documents its arguments and its result in NumPy sections.

Public: no leading underscore, defined in a module of ``conductance`` (packages included) or as a
method of a public class there. A function with parameters (besides ``self`` / ``cls``) needs a
``Parameters`` section; one whose return annotation is not ``None`` needs ``Returns`` (or
``Yields`` for a generator or context manager). Properties are attributes and are not checked.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Iterator

import conductance


def _sections(doc: str | None) -> set[str]:
    """Headings of a NumPy docstring: a line followed by a line of dashes."""
    lines = (doc or "").splitlines()
    return {a.strip() for a, b in zip(lines, lines[1:]) if re.fullmatch(r"\s*-{3,}\s*", b)}


def _needed(fn: Callable) -> set[str]:
    sig = inspect.signature(fn)
    need = set()
    if any(name not in ("self", "cls") for name in sig.parameters):
        need.add("Parameters")
    if sig.return_annotation not in (None, "None"):
        need.add("Returns")
    return need


def _lacking(fn: Callable) -> set[str]:
    have = _sections(inspect.getdoc(fn))
    if "Yields" in have:
        have.add("Returns")
    return _needed(fn) - have


def _public_functions() -> Iterator[tuple[str, Callable]]:
    modules = [conductance] + [importlib.import_module(m.name)
                               for m in pkgutil.walk_packages(conductance.__path__, "conductance.")]
    seen: set[int] = set()
    for module in modules:
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                candidates = [(f"{module.__name__}.{name}", obj)]
            elif inspect.isclass(obj):
                candidates = []
                for mname, member in vars(obj).items():
                    fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                    if not mname.startswith("_") and inspect.isfunction(fn):
                        candidates.append((f"{module.__name__}.{name}.{mname}", fn))
            else:
                continue
            for qualname, fn in candidates:
                if id(fn) not in seen:
                    seen.add(id(fn))
                    yield qualname, fn


def test_every_public_function_has_parameters_and_returns_sections():
    functions = dict(_public_functions())
    # the walk reaches the packages and the methods of their classes, not just the top-level modules
    for name in ("conductance.ablation.flips.flip_count", "conductance.aggregate.result.AggregateResult.mean",
                 "conductance.hf.result.reduce_layer", "conductance.hf.result.TransformerResult.reduce",
                 "conductance.experiments.report.percent", "conductance.engine.unit_error",
                 "conductance.attribute.run_path"):
        assert name in functions, name
    missing = {name: sorted(_lacking(fn)) for name, fn in functions.items() if _lacking(fn)}
    assert not missing, "public functions without NumPy sections:\n" + "\n".join(
        f"  {name}: {', '.join(sections)}" for name, sections in sorted(missing.items()))


def test_the_check_flags_a_missing_section():
    def documented(x: int) -> int:
        """Twice x.

        Parameters
        ----------
        x : int

        Returns
        -------
        int
        """
        return 2 * x

    def no_returns(x: int) -> int:
        """Twice x.

        Parameters
        ----------
        x : int
        """
        return 2 * x

    def no_sections(x):
        """Twice x: x (int) -> int."""
        return 2 * x

    def nothing_to_say() -> None:
        """Does nothing."""

    assert _lacking(documented) == set()
    assert _lacking(no_returns) == {"Returns"}
    assert _lacking(no_sections) == {"Parameters", "Returns"}
    assert _lacking(nothing_to_say) == set()
