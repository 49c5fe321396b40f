"""A self-contained HTML report plus a JSON file of every number.

The page is rendered from Jinja2 templates (``templates/``, autoescaped). Figures are matplotlib
figures, embedded in the page as base64 PNG (and also saved beside it), so the page opens anywhere
without its folder. Numbers are kept in a nested dict that is written as
``results.json``; tables in the page are built from the same values.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Report", "Section", "Missing", "percent", "shorten", "to_jsonable"]

#: Folder of the page's Jinja2 templates (report.html.j2, blocks.html.j2, report.css).
TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays and numpy scalars (recursively) to plain JSON values; NaN becomes None.

    Parameters
    ----------
    value : Any

    Returns
    -------
    Any
        Dicts, lists, numbers, strings and None only.
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a core dependency
        np = None  # type: ignore[assignment]  # the checks below test for None
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor
        value = value.detach().cpu().numpy()
    if np is not None and isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()] if value.ndim else to_jsonable(value.item())
    if np is not None and isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


class Missing(str):
    """A table cell with no value, shown as "n/a" with the reason in the table's note."""

    missing = True
    why: str

    def __new__(cls, why: str = "") -> Missing:
        cell = super().__new__(cls, "n/a")
        cell.why = why
        return cell


def percent(value: Any, digits: int = 1, why: str = "") -> str:
    """``value`` (a share in [0, 1]) as a percentage, or a :class:`Missing` cell when it is NaN.

    Parameters
    ----------
    value : float or Any convertible to float
    digits : int
        Decimals shown.
    why : str
        The reason a missing value is missing, for the table's note.

    Returns
    -------
    str or Missing
    """
    value = float(value)
    if not math.isfinite(value):
        return Missing(why)
    return f"{100 * value:.{digits}f}%"


def shorten(text: str, n: int = 70) -> str:
    """``text`` cut to at most ``n`` characters at a word boundary, with an ellipsis when cut.

    Parameters
    ----------
    text : str
    n : int

    Returns
    -------
    str
    """
    text = " ".join(str(text).split())
    if len(text) <= n:
        return text
    cut = text[:n - 1]
    if " " in cut and cut[-1].isalnum() and text[n - 1].isalnum():     # cut inside a word
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:.") + "…"


def _fmt(value: Any) -> str:
    if isinstance(value, Missing):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return Missing()
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?nan\s*%?\s*", value, re.IGNORECASE):
        # a number formatted from NaN upstream ("nan%"): never shown as if it were a value
        return Missing()
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "item"


@dataclass
class Section:
    """One titled part of a report: paragraphs, figures and tables in the order they were added.

    ``blocks`` holds dicts with a ``"kind"`` (``"text"``, ``"figure"``, ``"table"``, ``"html"``)
    that the Jinja2 templates in ``templates/`` render; a plain string is trusted HTML."""

    title: str
    key: str
    report: Report
    blocks: list[Any] = field(default_factory=list)

    def text(self, paragraph: str) -> Section:
        """Add a paragraph of plain text (escaped; blank lines start new paragraphs).

        Parameters
        ----------
        paragraph : str

        Returns
        -------
        Section
            Itself, so calls chain.
        """
        self.blocks.append({"kind": "text", "paragraphs": [p.strip() for p in paragraph.strip().split("\n\n")]})
        return self

    def html(self, fragment: str) -> Section:
        """Add a trusted HTML fragment as it is.

        Parameters
        ----------
        fragment : str

        Returns
        -------
        Section
            Itself.
        """
        self.blocks.append({"kind": "html", "html": fragment})
        return self

    def figure(self, fig: Any, caption: str, name: Optional[str] = None, dpi: int = 110) -> str:
        """Embed a matplotlib figure (closed afterwards); returns the PNG file name saved beside the page.

        Parameters
        ----------
        fig : matplotlib Figure
        caption : str
        name : str, optional
            File name stem; by default from the section and a counter.
        dpi : int

        Returns
        -------
        str
        """
        name = name or f"{self.key}-{len(self.blocks)}"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        try:
            import matplotlib.pyplot as plt
            plt.close(fig)
        except ImportError:  # pragma: no cover
            pass
        png = buffer.getvalue()
        filename = f"{_slug(name)}.png"
        self.report.files[filename] = png
        data = base64.b64encode(png).decode("ascii")
        self.blocks.append({"kind": "figure", "src": f"data:image/png;base64,{data}", "caption": caption,
                            "file": filename})
        return filename

    def table(self, rows: Sequence[Sequence[Any]], headers: Sequence[str], caption: Optional[str] = None,
              missing: str = "") -> Section:
        """Add a table; cells are formatted numbers or escaped text.

        Cells without a value (NaN, or a :class:`Missing` from :func:`percent`) show "n/a"; the
        note under the table gives ``missing`` (or each cell's own reason) as the explanation.

        Parameters
        ----------
        rows : sequence of sequences
            One row per line, as many cells as ``headers``.
        headers : sequence of str
        caption : str, optional
        missing : str
            Explanation of the missing cells.

        Returns
        -------
        Section
            Itself.
        """
        cells = [[_fmt(c) for c in row] for row in rows]
        cells = [[Missing(missing) if isinstance(c, Missing) and not c.why else c for c in row] for row in cells]
        reasons = list(dict.fromkeys((c.why or missing) for row in cells for c in row if isinstance(c, Missing)))
        notes = [f"n/a: {r or 'no value for this row (see results.json)'}." for r in reasons]
        self.blocks.append({"kind": "table", "caption": caption, "headers": [str(h) for h in headers],
                            "rows": cells, "notes": notes})
        return self

    def numbers(self, **values: Any) -> Section:
        """Record numbers under this section's key in ``results.json`` (not shown by themselves).

        Parameters
        ----------
        **values
            JSON-able values (tensors and arrays are converted).

        Returns
        -------
        Section
            Itself.
        """
        self.report.data.setdefault(self.key, {}).update(to_jsonable(values))
        return self


class Report:
    """An HTML report being built; :meth:`write` may be called repeatedly as sections finish.

    Parameters
    ----------
    title : str
    settings : dict
        Shown at the top of the page and stored under ``"settings"`` in the JSON.
    """

    def __init__(self, title: str, settings: Optional[dict] = None):
        self.title = title
        self.settings = dict(settings or {})
        self.sections: list[Section] = []
        self.data: dict[str, Any] = {}
        self.files: dict[str, bytes] = {}
        self.started = _dt.datetime.now(_dt.timezone.utc)

    def section(self, title: str, key: Optional[str] = None) -> Section:
        """Start a new section; ``key`` (default: from the title) names its numbers in the JSON.

        Parameters
        ----------
        title : str
        key : str, optional

        Returns
        -------
        Section
        """
        sec = Section(title=title, key=key or _slug(title), report=self)
        self.sections.append(sec)
        return sec

    def to_html(self) -> str:
        """The page, rendered from the Jinja2 templates in ``templates/`` (autoescaped).

        Returns
        -------
        str
        """
        try:
            import jinja2
        except ImportError as exc:
            raise ModuleNotFoundError("the HTML report needs Jinja2: pip install jinja2 (or pip install "
                                      "'conductance[report]')") from exc
        from .. import __version__

        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                 undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        sections = [{"title": s.title, "anchor": _slug(s.key),
                     "blocks": [b if isinstance(b, dict) else {"kind": "html", "html": b} for b in s.blocks]}
                    for s in self.sections]
        return env.get_template("report.html.j2").render(
            title=self.title, version=__version__, generated=self.started.strftime("%Y-%m-%d %H:%M UTC"),
            settings=[[str(k), _fmt(v)] for k, v in self.settings.items()], sections=sections)

    def write(self, out_dir: str) -> tuple[str, str]:
        """Write ``report.html``, ``results.json`` and ``figures/*.png`` into ``out_dir``.

        Parameters
        ----------
        out_dir : str
            Created when missing.

        Returns
        -------
        (html_path, json_path)
        """
        os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
        for name, png in self.files.items():
            with open(os.path.join(out_dir, "figures", name), "wb") as f:
                f.write(png)
        html_path = os.path.join(out_dir, "report.html")
        json_path = os.path.join(out_dir, "results.json")
        # Write to a temporary name first so an interrupted write never leaves half a file.
        for path, content in ((html_path, self.to_html()),
                              (json_path, json.dumps({"title": self.title, "settings": to_jsonable(self.settings),
                                                      **self.data}, indent=1, allow_nan=False))):
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)
            os.replace(tmp, path)
        return html_path, json_path
