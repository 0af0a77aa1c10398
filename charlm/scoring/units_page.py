"""The page's units sections (charlm.explain units.*): the top units as colour strips under the text, and
where holding units cost the most. Same character layout, escaping and hover panel as the surprisal view
(charlm.explain_page); each section is (CSS, HTML) for `render_html(extra=...)`.

A strip is one cell per run of characters whose activation falls in the same colour bin, as wide as the
run, so a unit that holds still for a line costs one element, not one per character.
"""

from __future__ import annotations

from html import escape
from itertools import groupby

import numpy as np

from charlm.explain_page import GAIN_EDGES, LN2, _bins, _colours, _legend, _palette, _table, _text_view
from charlm.scoring.units import UnitsFound

UNIT_EDGES = [-0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8]  # activation / the unit's max |activation|
STRIP_CSS = (".strip{white-space:pre;line-height:0;height:6px;margin-bottom:1px}"
             ".strip i{display:inline-block;width:1ch;height:6px}")


def _strip(title: str, bins: np.ndarray) -> str:
    cells = []
    for v, run in groupby(bins.tolist()):
        k = sum(1 for _ in run)
        cells.append(f'<i class="u{v}"' + (f' style="width:{k}ch"' if k > 1 else "") + "></i>")
    return f'<div class="strip" title="{escape(title, quote=True)}">{"".join(cells)}</div>'


def units_view(text: str, found: UnitsFound, model: str) -> tuple[str, str]:
    """The text, and under each line one strip per top unit, its activation scaled by its largest |value|."""
    scaled = [t.values / (np.abs(t.values).max() or 1.0) for t in found.top]
    strips = [(f"{t.label}: r = {t.r:+.3f} with {found.find}", _bins(s, UNIT_EDGES)) for t, s in zip(found.top, scaled)]

    def under(start: int, end: int) -> list[str]:
        return [_strip(title, b[start:end]) for title, b in strips]

    labels = ["-1"] + [f"{e:+.1f}" for e in UNIT_EDGES[1:-1]] + ["+1"]
    order = ", ".join(f"{t.label} (r = {t.r:+.3f})" for t in found.top)
    html = (f"<h2>Units of {escape(model)} tracking {escape(str(found.find))}</h2>"
            f"<p>Under each line, one strip per unit, top to bottom: {escape(order)}. Hover a strip for its unit "
            "and r (Pearson, point-biserial for a match; state carried from the first character).</p>"
            + _legend("u", labels, "activation / the unit's largest |activation| on this text:")
            + _text_view(text, "U", None, {}, under))
    return STRIP_CSS + _palette("u", _colours("RdBu_r", 10)), html


def ablation_view(text: str, found: UnitsFound, model: str) -> tuple[str, str]:
    """The text coloured by what holding the units cost each character (bits), and where it cost most."""
    a = found.ablation
    cost = a.cost / LN2                                                    # (n-1,) bits
    labels = ["<-2"] + [f"{lo:g}..{hi:g}" for lo, hi in zip(GAIN_EDGES, GAIN_EDGES[1:])] + [">2"]
    worst = np.argsort(-cost, kind="stable")[:12]

    def ctx(i: int) -> str:
        return repr(text[max(0, i - 20) : i]) + " \u2192 " + repr(text[i])

    html = (f"<h2>{escape(model)} with {escape(', '.join(a.units))} held at {escape(a.to)}</h2>"
            f"<p><b>{a.bpc:.4f}</b> bits/char held, {a.bpc_base:.4f} free ({a.bpc - a.bpc_base:+.4f}); "
            "each character coloured by its loss held minus free (red: holding costs).</p>"
            + _legend("X", labels, "bits held minus free:")
            + _text_view(text, "X", _bins(cost, GAIN_EDGES), {})
            + "<h3>Where holding them cost most</h3>"
            + _table(["position", "context \u2192 character", "cost (bits)"],
                     [[int(i) + 1, ctx(int(i) + 1), f"{cost[i]:+.3f}"] for i in worst]))
    return _palette("X", _colours("RdBu_r", 11)), html


def sections(text: str, found: UnitsFound | None, model: str) -> list[tuple[str, str]]:
    """The (CSS, HTML) sections `units.*` adds to the page."""
    if found is None:
        return []
    return ([units_view(text, found, model)] if found.top else []) + (
        [ablation_view(text, found, model)] if found.ablation else [])
