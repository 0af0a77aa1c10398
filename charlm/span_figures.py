"""The memory-span study's figures: accuracy against lag (seeds as bands, the truncated-BPTT runs beside),
and the gate openings over training next to the lag-gradient curves."""

from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, lags, r: dict, color: str, label: str, marker: str = "o") -> None:
    """Mean accuracy as a line, min..max over seeds as a band."""
    by_seed = list(r["accuracy_by_seed"].values())
    lo = [min(s[i] for s in by_seed) for i in range(len(lags))]
    hi = [max(s[i] for s in by_seed) for i in range(len(lags))]
    ax.fill_between(lags, lo, hi, color=color, alpha=0.18, lw=0)
    ax.plot(lags, r["accuracy"], marker + "-", ms=4, lw=1.6, color=color, label=label)


def _axes(ax, task: dict, title: str) -> None:
    ax.axhline(task["chance"], color="gray", ls=":", lw=0.8, label="chance")
    for t in task["thresholds"]:
        ax.axhline(t, color="gray", ls="--", lw=0.6)
    ax.set_xscale("symlog", linthresh=1)
    ax.set(xlabel="lag (characters between the symbol and the cue)", ylabel="recall accuracy", ylim=(0, 1.03),
           xlim=(-0.2, max(task["lags"]) * 1.2), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def plot_spans(span: dict, path: Path) -> None:
    """memory_span.png: every model (left), the truncated-BPTT runs of one model (right, when present)."""
    plt = _plt()
    task, lags = span["task"], span["task"]["lags"]
    tb = span.get("tbptt")
    fig, axes = plt.subplots(1, 2 if tb else 1, figsize=(13 if tb else 7.5, 4.8), squeeze=False)
    ax = axes[0, 0]
    for i, (name, r) in enumerate(span["models"].items()):
        color = f"C{i % 10}"
        s = "/".join(str(r["span"][str(t)]) for t in task["thresholds"])
        _band(ax, lags, r, color, f"{name} (span {s})", "osD^v<>px*"[i % 10])
        if r["window"] is not None:
            ax.axvline(r["window"], color=color, ls="-.", lw=1, label=f"{name} window {r['window']}")
    _axes(ax, task, f"Recall accuracy by lag ({task['steps']} steps, {len(task['seeds'])} seeds; span {'/'.join(map(str, task['thresholds']))})")
    if tb:
        ax = axes[0, 1]
        for i, (block, r) in enumerate(tb["runs"].items()):
            s = "/".join(str(r["span"][str(t)]) for t in task["thresholds"])
            _band(ax, lags, r, f"C{i}", f"block_size {block}, batch {r['batch_size']} (span {s})")
            ax.axvline(int(block), color=f"C{i}", ls=":", lw=1)
        _axes(ax, task, f"{tb['model']}: truncated BPTT length (dotted: data.block_size)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gates(gates: dict, path: Path, task: dict) -> None:
    """gates.png: gate openings over training per model and layer (left), lag-gradient curves (right),
    with the LSTM forget-gate product along the same path (dashed, scaled to the gradient at lag 1)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (name, g) in enumerate(gates.items()):
        color = f"C{i % 10}"
        hist = g["history"]
        keys = sorted({k for h in hist for k in h if k != "step"})
        for j, key in enumerate(keys):
            pts = [(h["step"], h[key]) for h in hist if key in h]
            ax1.plot(*zip(*pts), "o" + ["-", "--", ":", "-."][j % 4], color=color, ms=3, lw=1.2,
                     label=f"{name} {key}")
        curve = [v if v > 0 and math.isfinite(v) else float("nan") for v in g["curve"]]
        ax2.plot(range(len(curve)), curve, color=color, lw=1.4, label=name)
        c = g.get("forget_claim")
        if c and c["grad"]:
            scale = g["curve"][1]
            ax2.plot(c["lags"], [v * scale for v in c["forget_product"]], "--", color=color, lw=1.2,
                     label=f"{name}: forget-gate product (r={c['r']:.2f})")
    ax1.set(xlabel="training step", ylabel="mean gate opening (1 = keep)", ylim=(0, 1.02),
            title="Memory-gate openings over training (gates/...)")
    if not any(len(h) > 1 for g in gates.values() for h in g["history"]):
        ax1.text(0.5, 0.5, "no model declares gate_openings", ha="center", va="center", transform=ax1.transAxes)
    ax2.set_yscale("log")
    ax2.set(xlabel="lag k (characters before the cue)", ylabel="mean ||dL_cue / d emb_(cue-k)||",
            title="Lag-gradient at the recall position (trained)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
