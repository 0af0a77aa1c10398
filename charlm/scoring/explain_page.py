"""The page and picture `charlm.explain` writes: explain.html (self-contained) and explain.png.

Every piece of the text goes through `html.escape` (attributes too), and the data the inline script
reads is JSON with `<`, `>` and `&` written as \\u003c, \\u003e, \\u0026, so a text holding markup shows
it and runs nothing. The script only sets `textContent`.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

import numpy as np

from charlm.atomic import atomic_path, write_atomic

LN2 = math.log(2)
SURPRISAL_EDGES = list(range(1, 10))                                   # bits: 10 bins, the last 9+
GAIN_EDGES = [-2, -1.5, -1, -0.5, -0.1, 0.1, 0.5, 1, 1.5, 2]          # A nats - B nats: 11 bins
GATE_EDGES = [i / 10 for i in range(1, 10)]                            # openings: 10 bins
DISTANCES = [(1, 2), (3, 8), (9, 32), (33, 128), (129, None)]
CLASSES = ["speaker names", "letters", "spaces", "newline", "punctuation", "digits", "other"]


def _colours(cmap: str, n: int, lo: float = 0.05, hi: float = 0.95) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return [to_hex(colormaps[cmap](lo + (hi - lo) * i / (n - 1))) for i in range(n)]


def _ink(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "#111"


def _palette(prefix: str, colours: list[str]) -> str:
    return "".join(f".{prefix}{i}{{background:{c};color:{_ink(c)}}}" for i, c in enumerate(colours))


def char_classes(text: str) -> list[str]:
    """Each character's class; an uppercase run right after a newline is a speaker name."""
    out, at_line_start = [], True
    for c in text:
        if c == "\n":
            out.append("newline")
        elif c.isupper() and at_line_start:
            out.append("speaker names")
        elif c.isalpha():
            out.append("letters")
        elif c.isspace():
            out.append("spaces")
        elif c.isdigit():
            out.append("digits")
        elif c.isprintable():
            out.append("punctuation")
        else:
            out.append("other")
        at_line_start = c == "\n" or (at_line_start and (c.isupper() or c == " "))
    return out


def distances(text: str) -> list[int | None]:
    """Characters since the same character last occurred (None: its first occurrence)."""
    last: dict[str, int] = {}
    out = []
    for t, c in enumerate(text):
        out.append(t - last[c] if c in last else None)
        last[c] = t
    return out


def comparison(text: str, a, b) -> dict:
    """The summary of A against B: gain = B's nats - A's (positive: A predicts better), in bits."""
    gain = (b.losses - a.losses) / LN2                                  # (n-1,) bits, for characters 1..n-1
    classes, dist = char_classes(text)[1:], distances(text)[1:]
    def group(keys):
        rows = {}
        for key, g in zip(keys, gain):
            rows.setdefault(key, []).append(g)
        return rows
    by_class = group(classes)
    buckets = ["first occurrence" if d is None else next(f"{lo}-{hi}" if hi else f"{lo}+" for lo, hi in DISTANCES
                                                         if d >= lo and (hi is None or d <= hi)) for d in dist]
    by_dist = group(buckets)
    order = [f"{lo}-{hi}" if hi else f"{lo}+" for lo, hi in DISTANCES] + ["first occurrence"]
    top = np.argsort(-gain, kind="stable")[:12]
    return {"bpc": {t.name: t.bpc for t in (a, b)},
            "top": [(int(i) + 1, float(gain[i])) for i in top],
            "by_class": [(k, len(by_class[k]), float(np.mean(by_class[k]))) for k in CLASSES if k in by_class],
            "by_distance": [(k, len(by_dist[k]), float(np.mean(by_dist[k]))) for k in order if k in by_dist]}


def _show(c: str) -> str:
    return {"\n": "\u21b5", "\t": "\u21e5"}.get(c, c)


def _bins(values, edges) -> np.ndarray:
    return np.digitize(np.asarray(values, dtype=np.float64), edges)


def _text_view(text: str, view: str, bins: np.ndarray | None, gates: dict[str, np.ndarray],
               under=None) -> str:
    """The text, one span per character (class `c`, bin class, data-i), line by line, each line
    followed by one strip per gate layer, then what `under(start, end)` draws for characters start..end-1."""
    gate_bins = {k: _bins(v, GATE_EDGES) for k, v in gates.items()}
    out, line, start = [f'<div class="text" id="view-{view}" data-view="{view}">'], [], 0
    for t, c in enumerate(text):
        cls = "c" if t == 0 or bins is None else f"c {view[0]}{bins[t - 1]}"
        tip = ' title="context only: nothing predicts the first character"' if t == 0 else ""
        line.append(f'<span class="{cls}" data-i="{t}" tabindex="0"{tip}>{escape(_show(c), quote=True)}</span>')
        if c == "\n" or t == len(text) - 1:
            out.append(f'<div class="row">{"".join(line)}</div>')
            for k, gb in gate_bins.items():
                cells = "".join(f'<i class="g g{v}"></i>' for v in gb[start : t + 1])
                out.append(f'<div class="gates" title="{escape(k, quote=True)}">{cells}</div>')
            out.extend(under(start, t + 1) if under else ())
            line, start = [], t + 1
    out.append("</div>")
    return "\n".join(out)


def _legend(prefix: str, labels: list[str], caption: str) -> str:
    cells = "".join(f'<span class="{prefix}{i} key">{escape(lab)}</span>' for i, lab in enumerate(labels))
    return f'<p class="legend">{escape(caption)} {cells}</p>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _script_json(obj) -> str:
    """JSON safe inside <script>: no `<`, `>`, `&` (nor line separators) can end or open a tag."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for ch, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                     ("\u2029", "\\u2029")):
        s = s.replace(ch, code)
    return s


def page_data(traces) -> dict:
    """What the hover panel shows: per model, each character's loss, p(real) and top-k."""
    return {"models": [{"name": t.name, "chars": t.vocab.chars, "loss": np.round(t.losses, 6).tolist(),
                        "p": np.round(np.exp(-t.losses), 6).tolist(), "top": t.top_ids.tolist(),
                        "top_p": np.round(t.top_p, 6).tolist()} for t in traces]}


SCRIPT = """(function () {
  var D = JSON.parse(document.getElementById('explain-data').textContent);
  var info = document.getElementById('info');
  function name(c) { return c === '\\n' ? '\\\\n' : c === ' ' ? 'space' : c === '\\t' ? '\\\\t' : c; }
  function show(ev) {
    var s = ev.target.closest ? ev.target.closest('span.c') : null;
    if (!s) return;
    var i = +s.getAttribute('data-i'), lines = [];
    if (i === 0) { info.textContent = 'first character: context only, nothing predicts it'; return; }
    D.models.forEach(function (m) {
      var real = m.chars.indexOf(D.text[i]);
      lines.push(m.name + ': real ' + JSON.stringify(name(D.text[i])) + ' p=' + m.p[i - 1].toFixed(4) +
                 ', surprisal ' + (m.loss[i - 1] / Math.LN2).toFixed(3) + ' bits');
      lines.push('   top: ' + m.top[i - 1].map(function (c, j) {
        return JSON.stringify(name(m.chars[c])) + ' ' + m.top_p[i - 1][j].toFixed(4); }).join(',  '));
    });
    info.textContent = 'character ' + i + '\\n' + lines.join('\\n');
  }
  document.addEventListener('mouseover', show);
  document.addEventListener('focusin', show);
})();"""

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#111}
.text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;overflow-x:auto;border:1px solid #ddd;
padding:4px}
.row{white-space:pre;line-height:1.35}.c:focus{outline:2px solid #06c}
.gates{white-space:pre;line-height:0;height:4px;margin-bottom:1px}
i.g{display:inline-block;width:1ch;height:4px}
.legend .key{display:inline-block;min-width:2.2em;text-align:center;font-size:11px;margin-right:1px}
#info{position:sticky;top:0;background:#f7f7f7;border:1px solid #ccc;padding:6px;white-space:pre-wrap;
font-family:ui-monospace,monospace;font-size:12px;min-height:3.5em;z-index:1}
table{border-collapse:collapse;margin:0.6em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"""


def render_html(text: str, traces, where: str, extra: list[tuple[str, str]] = ()) -> str:
    """The whole page as one string; `extra`: (CSS, HTML) sections after the views (charlm.scoring.units_page)."""
    s_col, d_col, g_col = _colours("YlOrRd", 10, 0.0, 1.0), _colours("RdBu_r", 11), _colours("Greys", 10, 0.1, 1.0)
    css = CSS + _palette("A", s_col) + _palette("B", s_col) + _palette("D", d_col) + _palette("g", g_col)
    s_labels = [f"{e - 1}-{e}" for e in SURPRISAL_EDGES] + ["9+"]
    body = [f"<h1>{escape(where)}: {len(text):,} characters, character by character</h1>",
            "<p>" + "<br>".join(f"{escape(t.name)}: <b>{t.bpc:.4f}</b> bits/char on {len(t.losses):,} characters "
                                f"({escape(t.protocol['text'])})" for t in traces) + "</p>",
            '<div id="info" role="status" aria-live="polite">hover or focus (Tab) a character: the top-5 '
            "candidates that predicted it, its probability and surprisal</div>"]
    for t, view in zip(traces, "AB"):
        body.append(f"<h2>Surprisal under {escape(t.name)}</h2>")
        body.append(_legend(view, s_labels, "bits:"))
        if t.gates:
            body.append(f"<p>Under each line: mean memory-gate opening per layer ({', '.join(map(escape, t.gates))}), "
                        "white = forgets, black = keeps; state carried from the first character.</p>")
        body.append(_text_view(text, view, _bins(t.losses / LN2, SURPRISAL_EDGES), t.gates))
    if len(traces) == 2:
        a, b = traces
        body.append(f"<h2>{escape(a.name)} against {escape(b.name)}</h2>")
        d_labels = ["<-2"] + [f"{lo:g}..{hi:g}" for lo, hi in zip(GAIN_EDGES, GAIN_EDGES[1:])] + [">2"]
        body.append(_legend("D", d_labels, "A's nats minus B's (blue: A predicts better, red: B does):"))
        body.append(_text_view(text, "D", _bins(a.losses - b.losses, GAIN_EDGES), {}))
        body.append(_summary(text, comparison(text, a, b)))
    css += "".join(c for c, _ in extra)
    body += [h for _, h in extra]
    data = {"text": list(text), **page_data(traces)}
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>charlm explain</title>"
            f"<style>{css}</style></head><body>\n" + "\n".join(body) +
            f'\n<script type="application/json" id="explain-data">{_script_json(data)}</script>'
            f"\n<script>{SCRIPT}</script>\n</body></html>\n")


def _summary(text: str, cmp: dict) -> str:
    def ctx(i):
        return repr(text[max(0, i - 20) : i]) + " \u2192 " + repr(text[i])
    return ("<h3>Bits per character on this text</h3>" + _table(["model", "bits/char"], [[k, f"{v:.4f}"]
            for k, v in cmp["bpc"].items()]) + "<h3>Where A gains most (B's bits minus A's)</h3>" +
            _table(["position", "context \u2192 character", "gain (bits)"], [[i, ctx(i), f"{g:+.3f}"]
                                                                          for i, g in cmp["top"]]) +
            "<h3>Gain by character class</h3>" + _table(["class", "characters", "mean gain (bits/char)"],
                                                        [[k, n, f"{g:+.4f}"] for k, n, g in cmp["by_class"]]) +
            "<h3>Gain by distance since the character's previous occurrence</h3>" +
            _table(["distance", "characters", "mean gain (bits/char)"],
                   [[k, n, f"{g:+.4f}"] for k, n, g in cmp["by_distance"]]))


def _glyphs(text: str, cols: int, dpi: float, ax):
    """Every character of `text` drawn centred in its grid cell, as one collection of glyph outlines (one
    Text artist per character costs seconds for a few thousand)."""
    from matplotlib.collections import PathCollection
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    font, shapes = FontProperties(family="monospace", size=6), {}
    (_, low), (_, high) = TextPath((0, 0), "Mg", prop=font).get_extents().get_points()  # one baseline for all
    for c in {c for c in text if _show(c).strip()}:                    # blanks have no outline to draw
        path = TextPath((0, 0), _show(c), prop=font)                    # in points
        (x0, _), (x1, _) = path.get_extents().get_points()
        shapes[c] = path.transformed(Affine2D().translate(-(x0 + x1) / 2, -(low + high) / 2))
    t = np.array([i for i, c in enumerate(text) if c in shapes], dtype=np.int64)
    offsets = np.stack([t % cols, t // cols], axis=1).astype(float)    # (n, 2) cell centres, data coordinates
    return PathCollection([shapes[text[i]] for i in t], offsets=offsets, offset_transform=ax.transData,
                          transform=Affine2D().scale(dpi / 72), facecolors="black", edgecolors="none",
                          snap=False)  # snapping would collapse the straight-edged glyphs (I, l, -)


def render_png(text: str, traces, path: Path, cols: int = 80) -> None:
    """The text as a coloured grid, `cols` characters a row: A's surprisal, and A - B with a second model."""
    from matplotlib.figure import Figure

    rows = -(-len(text) // cols)
    def grid(values):
        g = np.full(rows * cols, np.nan)
        g[1 : 1 + len(values)] = values
        return g.reshape(rows, cols)
    panels = [(grid(traces[0].losses / LN2), "YlOrRd", 0, 10, f"surprisal under {traces[0].name} (bits)")]
    if len(traces) == 2:
        panels.append((grid(traces[0].losses - traces[1].losses), "RdBu_r", -2, 2, "A's nats minus B's"))
    fig = Figure(figsize=(12, len(panels) * (0.6 + min(rows, 120) * 0.14)), dpi=110)
    for k, (g, cmap, lo, hi, title) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        im = ax.imshow(g, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        if len(text) <= 4000:
            ax.add_collection(_glyphs(text, cols, fig.dpi, ax))
        ax.set_title(title[:100], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=fig.dpi)


def write_page(out: Path, text: str, traces, where: str, extra: list[tuple[str, str]] = ()) -> tuple[Path, Path]:
    """out/explain.html and out/explain.png, each written atomically (`extra`: render_html's)."""
    out = Path(out)
    html_path, png_path = out / "explain.html", out / "explain.png"
    write_atomic(html_path, render_html(text, traces, where, extra))
    render_png(text, traces, png_path)
    return html_path, png_path
