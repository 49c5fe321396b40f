"""A self-contained HTML report plus a JSON file of every number.

Figures are matplotlib figures, embedded in the page as base64 PNG (and also saved beside it), so
the page opens anywhere without its folder. Numbers are kept in a nested dict that is written as
``results.json``; tables in the page are built from the same values.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = ["Report", "Section", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays and numpy scalars (recursively) to plain JSON values; NaN becomes None."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a core dependency
        np = None
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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "item"


@dataclass
class Section:
    """One titled part of a report: paragraphs, figures and tables in the order they were added."""

    title: str
    key: str
    report: "Report"
    blocks: list[str] = field(default_factory=list)

    def text(self, paragraph: str) -> "Section":
        """Add a paragraph of plain text (escaped; blank lines start new paragraphs)."""
        for part in paragraph.strip().split("\n\n"):
            self.blocks.append(f"<p>{html.escape(part.strip())}</p>")
        return self

    def html(self, fragment: str) -> "Section":
        """Add a trusted HTML fragment as it is."""
        self.blocks.append(fragment)
        return self

    def figure(self, fig: Any, caption: str, name: Optional[str] = None, dpi: int = 110) -> str:
        """Embed a matplotlib figure (closed afterwards); returns the PNG file name saved beside the page."""
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
        self.blocks.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return filename

    def table(self, rows: Sequence[Sequence[Any]], headers: Sequence[str], caption: Optional[str] = None
              ) -> "Section":
        """Add a table; cells are formatted numbers or escaped text."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
                       for row in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.blocks.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def numbers(self, **values: Any) -> "Section":
        """Record numbers under this section's key in ``results.json`` (not shown by themselves)."""
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
        """Start a new section; ``key`` (default: from the title) names its numbers in the JSON."""
        sec = Section(title=title, key=key or _slug(title), report=self)
        self.sections.append(sec)
        return sec

    def to_html(self) -> str:
        settings = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                           for k, v in self.settings.items())
        toc = "".join(f'<li><a href="#{_slug(s.key)}">{html.escape(s.title)}</a></li>' for s in self.sections)
        body = "".join(f'<section id="{_slug(s.key)}"><h2>{html.escape(s.title)}</h2>{"".join(s.blocks)}</section>'
                       for s in self.sections)
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(self.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f2f2f2; }} td:first-child, th:first-child {{ text-align: left; }}
caption {{ caption-side: top; text-align: left; font-weight: 600; padding: 0.3em 0; }}
figure {{ margin: 1em 0; }} figure img {{ max-width: 100%; }}
figcaption {{ font-size: 0.9em; color: #555; }}
section {{ border-top: 1px solid #ddd; margin-top: 2em; }}
</style></head>
<body>
<h1>{html.escape(self.title)}</h1>
<p>Generated {self.started.strftime('%Y-%m-%d %H:%M UTC')} by conductance.</p>
<table class="settings"><caption>Settings</caption><tbody>{settings}</tbody></table>
<nav><ol>{toc}</ol></nav>
{body}
</body></html>
"""

    def write(self, out_dir: str) -> tuple[str, str]:
        """Write ``report.html``, ``results.json`` and ``figures/*.png`` into ``out_dir``.

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
