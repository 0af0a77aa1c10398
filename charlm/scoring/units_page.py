"""The page's units view (charlm.explain units.*): the text, and under each line a colour strip per top
unit and one of what holding units cost each character, then where it cost most. Same character layout,
escaping and hover panel as the surprisal view (charlm.scoring.explain_page); the section is (CSS, HTML) for
`render_html(extra=...)`.

A strip is one cell per run of characters whose colour bin is the same, as wide as the run, so a unit
that holds still for a line costs one element, not one per character (a page stays within a few MB).
"""

from __future__ import annotations

from html import escape
from itertools import groupby

import numpy as np

from charlm.scoring.explain_page import GAIN_EDGES, LN2, _bins, _colours, _legend, _palette, _table, _text_view
from charlm.scoring.units import UnitsFound

UNIT_EDGES = [-0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8]  # activation / the unit's max |activation|
STRIP_CSS = (".strip{white-space:pre;line-height:0;height:6px;margin-bottom:1px}"
             ".strip i{display:inline-block;width:1ch;height:6px}")


def _strip(title: str, prefix: str, bins: np.ndarray, widths: set[int]) -> str:
    """One strip: a cell per run of equal bins, `w{k}` making a run of k characters k wide (noted in widths)."""
    cells = []
    for v, run in groupby(bins.tolist()):
        k = sum(1 for _ in run)
        cells.append(f"<i class={prefix}{v}></i>" if k == 1 else f'<i class="{prefix}{v} w{k}"></i>')
        widths.add(k)
    return f'<div class="strip" title="{escape(title, quote=True)}">{"".join(cells)}</div>'


def units_view(text: str, found: UnitsFound, model: str) -> tuple[str, str]:
    """The text, and under each line one strip per top unit (its activation scaled by its largest |value|)
    and, with an ablation, one strip of what holding the units cost each character; then the cost table."""
    strips = [(f"{t.label}: r = {t.r:+.3f} with {found.find}", "u",
               _bins(t.values / (np.abs(t.values).max() or 1.0), UNIT_EDGES)) for t in found.top]
    a = found.ablation
    html = [f"<h2>Units of {escape(model)}" + (f" tracking {escape(str(found.find))}" if found.top else "") + "</h2>"]
    if found.top:
        order = ", ".join(f"{t.label} (r = {t.r:+.3f})" for t in found.top)
        labels = ["-1"] + [f"{e:+.1f}" for e in UNIT_EDGES[1:-1]] + ["+1"]
        html.append(f"<p>Under each line, one strip per unit, top to bottom: {escape(order)}. Hover a strip for its "
                    "unit and r (Pearson, point-biserial for a match; state carried from the first character).</p>"
                    + _legend("u", labels, "activation / the unit's largest |activation| on this text:"))
    if a is not None:
        cost = a.cost / LN2                                                # (n-1,) bits, characters 1..n-1
        held = f"{', '.join(a.units)} held at {a.to}"
        strips.append((f"bits with {held}, minus without", "x", _bins(np.concatenate([[0.0], cost]), GAIN_EDGES)))
        labels = ["<-2"] + [f"{lo:g}..{hi:g}" for lo, hi in zip(GAIN_EDGES, GAIN_EDGES[1:])] + [">2"]
        html.append(f"<p>With {escape(held)}: <b>{a.bpc:.4f}</b> bits/char, {a.bpc_base:.4f} without "
                    f"({a.bpc - a.bpc_base:+.4f}). The {'last ' if found.top else ''}strip under each line: what "
                    "holding them cost each character (red: it costs).</p>" + _legend("x", labels, "bits:"))
    widths: set[int] = set()

    def under(start: int, end: int) -> list[str]:
        return [_strip(title, prefix, b[start:end], widths) for title, prefix, b in strips]

    html.append(_text_view(text, "U", None, {}, under))
    if a is not None:
        worst = np.argsort(-a.cost, kind="stable")[:12]
        html.append("<h3>Where holding them cost most</h3>" + _table(
            ["position", "context \u2192 character", "cost (bits)"],
            [[int(i) + 1, _context(text, int(i) + 1), f"{a.cost[i] / LN2:+.3f}"] for i in worst]))
    css = (STRIP_CSS + "".join(f".strip i.w{k}{{width:{k}ch}}" for k in sorted(widths) if k > 1)
           + _palette("u", _colours("RdBu_r", 10)) + _palette("x", _colours("RdBu_r", 11)))
    return css, "".join(html)


def _context(text: str, i: int) -> str:
    return repr(text[max(0, i - 20) : i]) + " \u2192 " + repr(text[i])


def sections(text: str, found: UnitsFound | None, model: str) -> list[tuple[str, str]]:
    """The (CSS, HTML) section `units.*` adds to the page."""
    return [] if found is None else [units_view(text, found, model)]
