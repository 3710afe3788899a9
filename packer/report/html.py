"""index.html: one page with every figure beside it, inline CSS, nothing fetched from a network."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from packer.report.output import MARKER

SECTIONS = {
    "sizes": "Where the bytes went",
    "weights": "Weight distributions",
    "kernels": "Kernels",
    "activations": "Activations",
}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; } .notes { color: #8a5a00; }
nav a { margin-right: 1em; }
"""


def render_html(title: str, models: Sequence[dict[str, Any]], entries: Sequence[Any],
                notes: Sequence[str]) -> str:
    """`entries`: objects with name, section, caption and file (the PNG's name)."""
    parts = [MARKER, "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{escape(title)}</h1>", _model_table(models)]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes)
                     + "</ul>")
    present = [s for s in SECTIONS if any(e.section == s for e in entries)]
    parts.append("<nav>" + "".join(f'<a href="#{s}">{escape(SECTIONS[s])}</a>'
                                   for s in present) + "</nav>")
    for section in present:
        parts.append(f'<h2 id="{section}">{escape(SECTIONS[section])}</h2>')
        for e in (e for e in entries if e.section == section):
            parts.append(f'<figure id="{escape(e.name)}"><img src="{escape(e.file)}" '
                         f'alt="{escape(e.caption)}" loading="lazy">'
                         f"<figcaption>{escape(e.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _model_table(models: Sequence[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for m in models for k in m))
    head = "<tr>" + "".join(f"<th>{escape(k)}</th>" for k in keys) + "</tr>"
    rows = []
    for m in models:
        cells = []
        for k in keys:
            v = m.get(k, "")
            text = f"{v:,}" if isinstance(v, int) else str(v)
            cls = ' class="num"' if isinstance(v, int | float) else ""
            cells.append(f"<td{cls}>{escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + head + "".join(rows) + "</table>"
