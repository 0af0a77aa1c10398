"""The comparison's outputs: leaderboard.md / leaderboard.csv (sorted by the yardstick) and curves.png,
read from each run folder's results.json, curve.json and job.json (never from logs)."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from charlm.atomic import atomic_path, write_atomic

COLUMNS = ["model", "params", "tokens_per_s", "best_val_bpc", "best_val_bpc_sd", "best_val_loss", "window_val_loss",
           "window", "seconds_to_best", "tokens_to_best", "steps", "seeds", "protocol", "status", "error"]



def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def leaderboard(out: Path, models: list[str], seeds: list[int]) -> list[dict]:
    """One row per model from its runs' results.json and curve.json (mean over seeds), best bpc first."""
    rows = []
    for m in models:
        runs = [tuple(_read(out / f"{m}-{s}" / f"{f}.json") for f in ("results", "curve", "job")) for s in seeds]
        ok = [(r, c) for r, c, _ in runs if r.get("best_val_bpc") is not None]
        best = [next((p for p in c.get("points", []) if p["step"] == r.get("best_step")), {}) for r, c in ok]
        bpc, first = [r["best_val_bpc"] for r, _ in ok], ok[0][0] if ok else {}
        rows.append({
            "model": m, "params": first.get("params"), "tokens_per_s": _mean(r.get("tokens_per_s") for r, _ in ok),
            "best_val_bpc": _mean(bpc), "best_val_bpc_sd": statistics.stdev(bpc) if len(bpc) > 1 else None,
            "best_val_loss": _mean(r.get("best_val_loss") for r, _ in ok),
            "window_val_loss": _mean(r.get("window_val_loss") for r, _ in ok),
            "window": (first.get("window_protocol") or {}).get("window"),
            "seconds_to_best": _mean(p.get("seconds") for p in best),
            "tokens_to_best": _mean(p.get("tokens") for p in best),
            "steps": _mean(r.get("steps") for r, _ in ok), "seeds": f"{len(ok)}/{len(seeds)}",
            "protocol": (first.get("protocol") or {}).get("text", ""),
            "status": "ok" if len(ok) == len(seeds) else "failed" if any(j for *_, j in runs) else "missing",
            "error": next((j.get("error", "") for *_, j in runs if j), ""),
        })
    return sorted(rows, key=lambda r: (r["best_val_bpc"] is None, r["best_val_bpc"] or 0.0))


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float)):
        return f"{v:,.{0 if abs(v) >= 1000 else digits}f}"
    return str(v)


def machine() -> str:
    """The GPU's name, or the CPU's and its core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    return f"{cpu or 'CPU'} ({os.cpu_count()} cores)"


def markdown(rows: list[dict], cfg: DictConfig, seeds: list[int]) -> str:
    """leaderboard.md: what was compared, on what machine and when, then the table."""
    b, sd = cfg.budget, len(seeds) > 1
    budget = (f"{b.seconds} s of wall time per run (Lightning's max_time, validations included; LR flat after "
              "warmup)" if b.seconds is not None else f"{b.tokens:,} training tokens per run")
    text = (f"# charlm.compare\n\nBudget: {budget}. Recipes: `{Path(str(cfg.recipes)).stem}`. Seeds: "
            f"{', '.join(map(str, seeds))}{' (mean ± sd)' if sd else ''}. {machine()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}.\n\nval bpc: the best checkpoint on the yardstick (every val character "
            "scored once, `protocol`); window loss: nanoGPT-style, random windows (length in brackets) from an empty "
            "state; time to best: wall seconds (training and earlier validations) to the best weights.\n\n")
    head = ["model", "params", "train tok/s", "val bpc" + (" ± sd" if sd else ""), "val loss (nats)",
            "window loss (nats)", "s to best", "tokens to best", "steps"] + (["seeds"] if sd else []) + ["protocol"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        bpc = _fmt(r["best_val_bpc"]) + (f" ± {_fmt(r['best_val_bpc_sd'])}" if sd and r["best_val_bpc_sd"] else "")
        window = f"{_fmt(r['window_val_loss'])} ({r['window']})" if r["window_val_loss"] is not None else ""
        cells = [r["model"], _fmt(r["params"]), _fmt(r["tokens_per_s"], 0), bpc or r["status"],
                 _fmt(r["best_val_loss"]), window, _fmt(r["seconds_to_best"], 1), _fmt(r["tokens_to_best"], 0),
                 _fmt(r["steps"], 0)] + ([r["seeds"]] if sd else []) + [r["protocol"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [f"\n- {r['model']}: {r['status']}: {r['error']}" for r in rows if r["error"]]
    return text + "\n".join(lines) + "\n"


def plot_curves(out: Path, models: list[str], seeds: list[int]) -> None:
    """curves.png: val bpc against wall seconds and against training tokens, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, m in enumerate(models):
        for j, s in enumerate(seeds):
            pts = [p for p in _read(out / f"{m}-{s}" / "curve.json").get("points", []) if p["val_bpc"] is not None]
            for ax, x in zip(axes, ("seconds", "tokens")):
                ax.plot([p[x] for p in pts], [p["val_bpc"] for p in pts], marker=".", color=f"C{i % 10}",
                        linestyle="-" if i < 10 else "--", label=m if j == 0 else None)
    for ax, label in zip(axes, ("wall seconds (training and validation)", "training tokens")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val bpc (in-training validation)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "curves.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, cfg: DictConfig, models: list[str], seeds: list[int]) -> None:
    """leaderboard.csv, leaderboard.md and curves.png in `out`."""
    rows = leaderboard(out, models, seeds)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "leaderboard.csv", buf.getvalue())
    write_atomic(out / "leaderboard.md", markdown(rows, cfg, seeds))
    plot_curves(out, models, seeds)
