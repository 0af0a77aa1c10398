"""Units inside a model: which of them track a pattern of the text, and what the text costs without them.

Find: each character of the stretch gets a target, 1 inside a match of the pattern and 0 outside (for
`line`, the character's column); every unit of every traced layer is ranked by the correlation of its
activation with it (Pearson's r, which for a 0/1 target is the point-biserial r). The activations come
from the contract's `unit_trace`, read chunk by chunk with the state carried from the stretch's first
character, as the yardstick reads the text; the activation at character t is the model's after reading t.

Ablate: the contract's `hold_units` fixes units at zero, or at their mean over the stretch, while the
yardstick's pass scores the stretch again; the cost of a character is its loss held minus its loss free.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import ListConfig

from charlm.errors import ConfigError
from charlm.models.contract import capabilities

MAX_TOP = 16  # unit rows on the page: each adds a strip under every line of text


@dataclass
class UnitsKeys:
    """`units.*` of charlm.explain (conf/explain.yaml)."""

    find: Optional[str] = None
    top: int = 8
    layer: Optional[int] = None
    source: str = "h"
    ablate: Any = None
    ablate_to: str = "zero"


@dataclass
class Unit:
    """One unit and how it tracks the pattern: its layer, index, r, and activation at each character."""

    layer: str
    unit: int
    r: float
    values: np.ndarray = field(repr=False)  # (n,)

    @property
    def label(self) -> str:
        return f"{self.layer}:{self.unit}"


@dataclass
class Ablation:
    """The stretch scored again with `units` held: bits/char held and free, and each character's cost (nats)."""

    units: list[str]
    to: str
    bpc: float
    bpc_base: float
    cost: np.ndarray = field(repr=False)  # (n-1,) held loss - free loss, nats, for characters 1..n-1


@dataclass
class UnitsFound:
    """What `units.*` asked of model A on the stretch."""

    find: Optional[str]
    source: str
    top: list[Unit]
    ablation: Optional[Ablation]


# ---- the patterns -----------------------------------------------------------------------------------


def _quote(text: str) -> np.ndarray:
    """1 from an opening double quote up to its closing one (the closing quote itself is outside)."""
    inside, out = False, []
    for c in text:
        inside = (not inside) if c == '"' else True if c == "\u201c" else False if c == "\u201d" else inside
        out.append(inside)
    return np.array(out, dtype=np.float64)


def _bracket(text: str) -> np.ndarray:
    """1 from an opening bracket ( [ { up to its closing one, nested brackets counted."""
    depth, out = 0, []
    for c in text:
        depth = depth + 1 if c in "([{" else max(0, depth - 1) if c in ")]}" else depth
        out.append(depth > 0)
    return np.array(out, dtype=np.float64)


def _line(text: str) -> np.ndarray:
    """Each character's column: 0 for the first character of a line (a newline ends its line)."""
    col, out = 0, []
    for c in text:
        out.append(col)
        col = 0 if c == "\n" else col + 1
    return np.array(out, dtype=np.float64)


CAPS = r"(?m)^[A-Z][A-Z' ]*[A-Z](?=:$)"  # a speaker's name in capitals, alone on its line before the colon
PATTERNS: dict[str, Callable[[str], np.ndarray] | str] = {"quote": _quote, "line": _line, "caps": CAPS,
                                                          "bracket": _bracket}
SAYS = {"quote": "no double quote", "bracket": "no bracket", "caps": "no speaker name in capitals"}


def compile_pattern(find: str):
    """The built-in target, or the compiled regex; a broken regex is one ConfigError."""
    built_in = PATTERNS.get(find)
    if callable(built_in):
        return built_in
    try:
        return re.compile(built_in or find)
    except re.error as e:
        raise ConfigError(f"units.find={find!r}: not a regular expression ({e})") from None


def target(find: str, text: str) -> np.ndarray:
    """(n,) float64: each character's target for `find` (1 inside a match, else 0; `line`: the column)."""
    pattern = compile_pattern(find)
    if callable(pattern):
        y = pattern(text)
    else:
        y = np.zeros(len(text))
        for m in pattern.finditer(text):
            y[m.start() : m.end()] = 1.0
    if not y.any():
        raise ConfigError(f"units.find={find}: {SAYS.get(find, 'matches nothing')} in the {len(text):,} characters "
                          "explained")
    if y.min() == y.max():
        raise ConfigError(f"units.find={find}: every one of the {len(text):,} characters is inside a match; "
                          "nothing to tell apart")
    return y


def check_units(u) -> None:
    """The keys that need no model nor text: ranges, choices, a regex that compiles."""
    if not 1 <= u.top <= MAX_TOP:
        raise ConfigError(f"units.top={u.top}: must be in 1..{MAX_TOP} (each unit is a strip under every line)")
    if u.layer is not None and u.layer < 0:
        raise ConfigError(f"units.layer={u.layer}: must be >= 0")
    if u.ablate_to not in ("zero", "mean"):
        raise ConfigError(f"units.ablate_to={u.ablate_to}: must be zero or mean")
    if not str(u.source).strip():
        raise ConfigError("units.source: empty; h (the hidden state) or c (a cell state)")
    if u.find is not None:
        if not str(u.find):
            raise ConfigError("units.find: empty; a regex, or quote, line, caps, bracket")
        compile_pattern(str(u.find))


# ---- activations and correlations -------------------------------------------------------------------


@torch.no_grad()
def activations(model: torch.nn.Module, ids: torch.Tensor, chunk: int, device: str) -> dict[str, np.ndarray]:
    """{layer: (n, U)} float32: `unit_trace` over ids (n,) chunk by chunk, the state carried."""
    hook = capabilities(model).unit_trace
    parts: dict[str, list[np.ndarray]] = {}
    state = None
    for a in range(0, len(ids), chunk):
        acts, state = hook(ids[None, a : a + chunk].to(device), state)            # {layer: (1, t, U)}
        for key, x in acts.items():
            parts.setdefault(key, []).append(x[0].float().cpu().numpy())
    return {key: np.concatenate(p) for key, p in parts.items()}


def layers_of(acts: dict[str, np.ndarray], source: str) -> dict[int, str]:
    """{layer index: name} of the traced layers of kind `source` ("layer{i}/{source}")."""
    found = {}
    for name in acts:
        m = re.fullmatch(r"layer(\d+)/(\w+)", name)
        if m and m.group(2) == source:
            found[int(m.group(1))] = name
    if not found:
        kinds = sorted({n.rsplit("/", 1)[-1] for n in acts})
        raise ConfigError(f"units.source={source}: the model offers " + (" and ".join(kinds) if kinds else
                          "no units to trace"))
    return dict(sorted(found.items()))


def correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(U,) Pearson's r of each column of x (n, U) with y (n,); 0 for a unit that never moves."""
    xc = x.astype(np.float64) - x.mean(0)                                           # (n, U)
    yc = y - y.mean()                                                               # (n,)
    norm = np.sqrt((xc**2).sum(0)) * np.sqrt((yc**2).sum())                        # (U,)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc[:, None]).sum(0) / norm
    return np.where(norm > 0, r, 0.0)


def top_units(acts: dict[str, np.ndarray], layers: dict[int, str], y: np.ndarray, top: int,
              layer: int | None) -> list[Unit]:
    """The `top` units of the given layers (or of layer `layer` alone) with the largest |r|."""
    if layer is not None:
        if layer not in layers:
            raise ConfigError(f"units.layer={layer}: the model's layers are {_span(layers)}")
        layers = {layer: layers[layer]}
    rows = [(abs(r), name, u, r) for name in layers.values() for u, r in enumerate(correlations(acts[name], y))]
    rows.sort(key=lambda row: (-row[0], row[1], row[2]))
    return [Unit(name, u, float(r), acts[name][:, u]) for _, name, u, r in rows[:top]]


def _span(layers: dict[int, str]) -> str:
    return ", ".join(str(k) for k in layers)


# ---- ablation ---------------------------------------------------------------------------------------


def parse_ablate(spec, acts: dict[str, np.ndarray], layers: dict[int, str]) -> list[tuple[str, int]]:
    """[(layer name, unit)] from `units.ablate`: a list (or one) of `unit` (one-layer models) or `layer:unit`."""
    items = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
    if not items:
        raise ConfigError("units.ablate=[]: name at least one unit (unit, or layer:unit)")
    out = []
    for item in items:
        m = re.fullmatch(r"\s*(?:(\d+)\s*:)?\s*(\d+)\s*", str(item))
        if m is None:
            raise ConfigError(f"units.ablate={item}: write a unit as unit or layer:unit (e.g. 0:17)")
        if m.group(1) is None and len(layers) > 1:
            raise ConfigError(f"units.ablate={item}: the model has layers {_span(layers)}; write layer:unit")
        k, u = int(m.group(1) or next(iter(layers))), int(m.group(2))
        if k not in layers:
            raise ConfigError(f"units.ablate={item}: no layer {k}; the model's layers are {_span(layers)}")
        size = acts[layers[k]].shape[1]
        if u >= size:
            raise ConfigError(f"units.ablate={item}: {layers[k]} has {size} units (0..{size - 1})")
        if (layers[k], u) not in out:
            out.append((layers[k], u))
    return out


def hold_values(units: list[tuple[str, int]], acts: dict[str, np.ndarray], to: str) -> dict[str, dict[int, float]]:
    """{layer: {unit: value}}: zero, or the unit's mean activation over the stretch."""
    hold: dict[str, dict[int, float]] = {}
    for name, u in units:
        hold.setdefault(name, {})[u] = 0.0 if to == "zero" else float(acts[name][:, u].mean())
    return hold


def inspect_units(model: torch.nn.Module, text: str, ids: torch.Tensor, u, chunk: int, device: str,
                  base_losses: np.ndarray, rescore: Callable[[], np.ndarray]) -> UnitsFound:
    """Everything `units.*` asks (u: the node), read and checked before anything is written. `rescore()`
    gives the stretch's per-character losses (nats) under the yardstick's pass, called with units held."""
    y = target(str(u.find), text) if u.find is not None else None   # no pattern in the text: said first
    acts = activations(model, ids, chunk, device)
    layers = layers_of(acts, str(u.source))
    top = top_units(acts, layers, y, int(u.top), u.layer) if y is not None else []
    ablation = None
    if u.ablate is not None:
        units = parse_ablate(u.ablate, acts, layers)
        with capabilities(model).hold_units(hold_values(units, acts, u.ablate_to)):
            held = rescore()
        ablation = Ablation([f"{n}:{k}" for n, k in units], str(u.ablate_to), _bpc(held), _bpc(base_losses),
                            held - base_losses)
    return UnitsFound(None if u.find is None else str(u.find), str(u.source), top, ablation)


def _bpc(losses: np.ndarray) -> float:
    return float(losses.sum() / len(losses) / np.log(2))


def summary(found: UnitsFound) -> dict:
    """What units.json holds: the top units (layer, unit, corr) and the ablation (units, bpc, bpc_base)."""
    out: dict[str, Any] = {"find": found.find, "source": found.source,
                           "units": [{"layer": t.layer, "unit": t.unit, "corr": round(t.r, 6)} for t in found.top]}
    if found.ablation is not None:
        a = found.ablation
        out["ablation"] = {"units": a.units, "to": a.to, "bpc": round(a.bpc, 6), "bpc_base": round(a.bpc_base, 6)}
    return out


def lines(found: UnitsFound, n: int) -> list[str]:
    """What charlm.explain prints: the top units as `layer, unit, r`, and the ablation's bits/char."""
    out = []
    if found.find is not None:
        what = "point-biserial r" if found.find != "line" else "Pearson r with the column"
        out.append(f"units tracking {found.find} ({what} over {n:,} chars, state carried):")
        out.append(f"  {'layer':<10} {'unit':>5} {'r':>7}")
        out += [f"  {t.layer:<10} {t.unit:>5} {t.r:>+7.3f}" for t in found.top]
    if found.ablation is not None:
        a = found.ablation
        out.append(f"ablation ({', '.join(a.units)} held at {a.to}): {a.bpc:.4f} bits/char, {a.bpc_base:.4f} "
                   f"without ({a.bpc - a.bpc_base:+.4f})")
    return out
