"""The report's units study: the default LSTM and GRU trained on tiny shakespeare (through the builder, as
`python -m charlm.train model=NAME` would), then, on the first `n_chars` val characters read as the
yardstick reads them (one stream, state carried), the hidden unit that best tracks each pattern (quote,
line, caps: charlm.scoring.units), its r, what the text costs with that unit held at its mean, and a small
picture of it under the text. Writes units.png and units.json; `markdown` writes REPORT.md's section, next
to what Karpathy, Johnson and Fei-Fei (2015) found.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from charlm.atomic import atomic_path, write_json
from charlm.errors import ConfigError
from charlm.explain import pick_device, trace
from charlm.models.contract import capabilities
from charlm.scoring.units import activations, hold_values, layers_of, target, top_units

WEAK = 0.3  # |r| below this: no unit tracks the pattern
EXCERPT = (4, 60)  # the picture: rows x columns of characters


def _bpc(losses: np.ndarray) -> float:
    return float(losses.sum() / len(losses) / np.log(2))


def _excerpt_start(y: np.ndarray, n: int) -> int:
    """Where the picture starts: a little before the pattern's first change (0 for `line`)."""
    changes = np.flatnonzero(np.diff(y))
    start = int(changes[0]) - 20 if len(changes) else 0
    return max(0, min(start, len(y) - n))


def study_model(model: torch.nn.Module, vocab, text: str, patterns: list[str], to: str, chunk: int,
                device: str) -> dict:
    """For each pattern: the best unit of the hidden state h ({layer, unit, r, bpc, bpc_base, values, start}),
    or {absent: why} when the text never shows the pattern."""
    ids = torch.as_tensor(vocab.encode_array(text).astype(np.int64))
    device = pick_device(device)  # the report's device: auto | cpu | cuda
    model = model.to(device).eval()
    base = trace(model, vocab, text, "base", chunk, device=device, gates=False).losses
    acts = activations(model, ids, chunk, device)
    layers = layers_of(acts, "h")
    rows = {}
    for pattern in patterns:
        try:
            y = target(pattern, text)
        except ConfigError as e:
            rows[pattern] = {"absent": str(e).split(": ", 1)[-1]}
            continue
        best = top_units(acts, layers, y, 1, None)[0]
        with capabilities(model).hold_units(hold_values([(best.layer, best.unit)], acts, to)):
            held = trace(model, vocab, text, "held", chunk, device=device, gates=False).losses
        n = EXCERPT[0] * EXCERPT[1]
        start = _excerpt_start(y, n)
        rows[pattern] = {"layer": best.layer, "unit": best.unit, "r": best.r, "bpc": _bpc(held),
                         "bpc_base": _bpc(base), "start": start, "values": best.values[start : start + n].tolist()}
    return {"chars": len(text), "units": sum(acts[name].shape[1] for name in layers.values()), "patterns": rows}


def units_study(cfg: DictConfig, preset: DictConfig, out: Path) -> dict:
    """Train each model of `preset.units`, study it, draw units.png and write units.json."""
    from charlm.studies.quickfit import fit

    up = preset.units
    sizes = OmegaConf.to_container(up.model, resolve=True) if up.get("model") else {}
    models = {}
    for name in up.models:
        overrides = [f"model={name}", f"trainer.max_steps={up.steps}", f"trainer.val_check_interval={up.steps}",
                     *(up.get("overrides") or [])]
        module, dm, _ = fit(overrides, sizes, cfg.device, seed=cfg.seed)
        text = dm.vocab.decode(dm.splits["val"][: up.n_chars].tolist())
        models[name] = {"steps": int(up.steps), "text": text,
                        **study_model(module.model, dm.vocab, text, list(up.patterns), up.ablate_to, 256, cfg.device)}
        best = [f"{p} {r['r']:+.2f}" for p, r in models[name]["patterns"].items() if "r" in r]
        print(f"report: units of {name}: best r {', '.join(best) or 'none'}")
    study = {"ablate_to": str(up.ablate_to), "models": models}
    plot_units(study, out / "units.png")
    write_json(out / "units.json", {**study, "models": {k: {kk: vv for kk, vv in v.items() if kk != "text"}
                                                        for k, v in models.items()}})
    return study


def plot_units(study: dict, path: Path) -> None:
    """One panel per model and pattern: the excerpt's characters on a grid coloured by the unit's activation."""
    from matplotlib.figure import Figure

    from charlm.scoring.explain_page import _glyphs

    models = study["models"]
    patterns = list(next(iter(models.values()))["patterns"])
    rows, cols = EXCERPT
    fig = Figure(figsize=(5.2 * len(patterns), 1.5 * len(models) + 0.3), dpi=110)
    for i, (name, m) in enumerate(models.items()):
        for j, pattern in enumerate(patterns):
            r = m["patterns"][pattern]
            ax = fig.add_subplot(len(models), len(patterns), i * len(patterns) + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if "absent" in r:
                ax.text(0.5, 0.5, f"{name}, {pattern}:\n{r['absent']}", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes)
                continue
            v = np.full(rows * cols, np.nan)
            v[: len(r["values"])] = r["values"]
            scale = float(np.nanmax(np.abs(v))) or 1.0
            ax.imshow(v.reshape(rows, cols), cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto",
                      interpolation="nearest")
            ax.add_collection(_glyphs(m["text"][r["start"] : r["start"] + rows * cols], cols, fig.dpi, ax))
            ax.set_title(f"{name} {r['layer']}:{r['unit']}, {pattern}: r = {r['r']:+.2f}, held "
                         f"{r['bpc'] - r['bpc_base']:+.3f} bits/char", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=fig.dpi)


def markdown(study: dict) -> list[str]:
    """REPORT.md's section: the table, the picture, and what it says next to Karpathy et al. (2015)."""
    to = study["ablate_to"]
    md = ["## Units that track the text", "",
          "Each model trained on tiny shakespeare as `python -m charlm.train model=NAME` does (steps below), then read "
          "on its first val characters as the yardstick reads them (one stream, state carried). For each pattern, "
          "the unit of the hidden state h with the largest |r| (Pearson; point-biserial for a 0/1 pattern) and the "
          f"bits/char on the same characters with that unit held at its {to} (`charlm.explain units.find=... "
          "units.ablate=...`). quote: inside double quotes; line: the column; caps: a speaker's name in capitals.",
          "", "![units](units.png)", "",
          "| model | steps | chars | pattern | best unit | r | bits/char | held | cost |",
          "|---|---|---|---|---|---|---|---|---|"]
    found = []
    for name, m in study["models"].items():
        for pattern, r in m["patterns"].items():
            if "absent" in r:
                md.append(f"| {name} | {m['steps']} | {m['chars']:,} | {pattern} | - | - | - | - | {r['absent']} |")
                continue
            md.append(f"| {name} | {m['steps']} | {m['chars']:,} | {pattern} | {r['layer']}:{r['unit']} of "
                      f"{m['units']} | {r['r']:+.3f} | {r['bpc_base']:.4f} | {r['bpc']:.4f} | "
                      f"{r['bpc'] - r['bpc_base']:+.4f} |")
            found.append((name, pattern, r))
    strong = [f"{n} {p} ({r['r']:+.2f})" for n, p, r in found if abs(r["r"]) >= WEAK]
    weak = [f"{n} {p} ({r['r']:+.2f})" for n, p, r in found if abs(r["r"]) < WEAK]
    absent = {p: r["absent"] for m in study["models"].values() for p, r in m["patterns"].items() if "absent" in r}
    md += ["", "Karpathy, Johnson and Fei-Fei (2015, \"Visualizing and Understanding Recurrent Networks\") found, in "
           "LSTMs trained on War and Peace and on the Linux kernel, cells that turn on inside quotes, that count the "
           "position in a line, and that follow the depth of a nested expression; their models were up to three "
           "layers of 512 cells. Here:", ""]
    md.append(f"- a unit at |r| >= {WEAK}: " + (", ".join(strong) if strong else "none") + ".")
    if weak:
        md.append(f"- no unit above |r| = {WEAK}: " + ", ".join(weak) + ".")
    for p, why in absent.items():
        md.append(f"- {p}: not measurable, {why}" + (" (tiny shakespeare holds no double quote at all: no quote cell "
                                                     "can form on it)" if p == "quote" else "") + ".")
    md.append("- r is a correlation over consecutive characters, which are far from independent; it ranks units, "
              "it is not a test. The cost is one held unit on these characters only.")
    return md
