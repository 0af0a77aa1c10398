"""The comparison's outputs: leaderboard.md / leaderboard.csv (sorted by the yardstick) and curves.png,
read from each run folder's results.json, curve.json, context.json and job.json (never from logs).

Seeds are paired: seed s gives every model the same initial RNG state, and models that sample random
windows of the same shape the same windows (charlm.data.datamodule: batch k is a function of (seed, k) alone). Each
model is set against the leader (lowest mean val bpc) seed by seed: the mean of (model - leader) over the
seeds both finished and its standard error, sd(differences) / sqrt(n). The seeds are independent runs, so
that standard error holds whether or not the pairing makes the two models' results move together.

The test is the paired t-test: t = mean / SE with n - 1 degrees of freedom, a 95% interval mean +- q SE
(q = 4.30 with 3 seeds), and `*` only where the difference stays below 5% after Holm's correction across
the models set against the leader (the leader is picked after seeing the results, then every other model
is compared with it: several tests at once).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from charlm.atomic import atomic_path, write_atomic
from charlm.errors import ConfigError
from charlm.scoring.context_verdicts import context_cell
from charlm.scoring.significance import LEVEL, holm, t_p_value, t_quantile

COLUMNS = ["model", "params", "tokens_per_s", "best_val_bpc", "best_val_bpc_sd", "vs_leader", "vs_leader_se",
           "vs_leader_low", "vs_leader_high", "vs_leader_p", "vs_leader_p_holm", "vs_leader_mark", "sign_agrees",
           "paired_seeds", "effective_context", "best_val_loss", "window_val_loss", "window", "seconds_to_best",
           "tokens_to_best", "steps", "seeds", "startup_seconds", "final_eval_seconds", "context_seconds", "protocol",
           "status", "error"]
ONE_SEED = "n/a (1 seed)"
SPREAD_TOL = 1e-12  # an SE below this is float noise in bpc differences: no spread


def read_json(path: Path) -> dict:
    """A run's JSON file (results, curve, context ...), or {} when the run has not written it."""
    return json.loads(path.read_text()) if path.exists() else {}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def paired_difference(model: dict[int, float], leader: dict[int, float]) -> dict:
    """`model` minus `leader` ({seed: val bpc}) over the seeds both have: n, mean, standard error (sd / sqrt(n)),
    whether every difference has the same (nonzero) sign, the paired t-test (t, two-sided p with n - 1 degrees
    of freedom), the 95% interval (low, high), and the mark: the interval excludes 0 (before any correction for
    several comparisons: `holm`). Below 2 seeds there is no spread to compare against: mean, se and agree are
    None. With no spread (se 0) there is no test: t, p and the interval are None, unmarked, whatever the signs."""
    diffs = [model[s] - leader[s] for s in sorted(set(model) & set(leader))]
    n = len(diffs)
    out = {"n": n, "mean": None, "se": None, "agree": None, "mark": False, "t": None, "p": None, "low": None,
           "high": None}
    if n < 2:
        return out
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(n)
    agree = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    out.update(mean=mean, se=se, agree=agree)
    if se > SPREAD_TOL:
        t, half = mean / se, t_quantile(n - 1) * se
        out.update(t=t, p=t_p_value(t, n - 1), low=mean - half, high=mean + half)
        out["mark"] = out["low"] > 0 or out["high"] < 0
    return out


def footnote(rows: list[dict], n_seeds: int) -> str:
    """Under the table: how Δ, its interval and the mark were computed, for these rows and seeds."""
    tested = sum(r.get("vs_leader_p") is not None for r in rows)
    q = f" ({n_seeds} seeds: Δ ± {t_quantile(n_seeds - 1):.2f} SE)" if n_seeds > 1 else ""
    return (f"Δ vs leader: this model's val bpc minus the leader's on the same seed, averaged over the n seeds both "
            f"finished, ± its standard error (sd of those differences / √n), then its 95% interval by Student's t "
            f"with n − 1 degrees of freedom{q}. * where the difference is significant at 5% (two-sided paired "
            f"t-test) after Holm's correction across the {tested} model(s) tested against the leader: the leader is "
            "the lowest mean, picked after seeing the results, and every other model is compared with it. A * "
            "row's interval excludes 0; an interval that excludes 0 without a * did not survive the correction. "
            "Picking the leader afterwards still favours it: its lead over a close second is likely overstated. "
            "Signs agree: every seed's difference has the same sign; with no spread (SE 0) there is no test, and "
            "the agreeing signs are all the seeds say. Effective context: characters of context the best "
            "checkpoint makes use of (charlm.studies.context), averaged over the seeds measured (compare's "
            "context_seeds: the first).")


def run_row(out: Path, m: str, seeds: list[int]) -> dict:
    """One row per model from its runs' results.json, curve.json and context.json (mean over seeds)."""
    runs = {s: {f: read_json(out / f"{m}-{s}" / f"{f}.json") for f in ("results", "curve", "job", "context")}
            for s in seeds}
    ok = {s: r for s, r in runs.items() if r["results"].get("best_val_bpc") is not None}
    res = [r["results"] for r in ok.values()]
    best = [next((p for p in r["curve"].get("points", []) if p["step"] == r["results"].get("best_step")), {})
            for r in ok.values()]
    bpc = {s: r["results"]["best_val_bpc"] for s, r in ok.items()}
    partial = {s: (r["results"].get("scored_chars"), r["results"].get("total_chars")) if r["results"].get("partial")
               else None for s, r in ok.items()}  # eval.final_max_chars: (N, M) of the val split scored
    first = res[0] if res else {}
    return {
        "model": m, "params": first.get("params"), "tokens_per_s": _mean(r.get("tokens_per_s") for r in res),
        "best_val_bpc": _mean(bpc.values()), "bpc_by_seed": bpc, "partial_by_seed": partial,
        "best_val_bpc_sd": statistics.stdev(bpc.values()) if len(bpc) > 1 else None,
        "effective_context": _mean(r["context"].get("effective_context") for r in ok.values()),  # seeds that reached it
        "context_cell": context_cell([r["context"] for r in ok.values()]),
        "best_val_loss": _mean(r.get("best_val_loss") for r in res),
        "window_val_loss": _mean(r.get("window_val_loss") for r in res),
        "window": (first.get("window_protocol") or {}).get("window"),
        "seconds_to_best": _mean(p.get("seconds") for p in best),
        "tokens_to_best": _mean(p.get("tokens") for p in best),
        "steps": _mean(r.get("steps") for r in res), "seeds": f"{len(ok)}/{len(seeds)}",
        "startup_seconds": _mean(r.get("startup_seconds") for r in res),
        "final_eval_seconds": _mean(r.get("final_eval_seconds") for r in res),
        "context_seconds": _mean(r["context"].get("seconds") for r in ok.values()),
        "protocol": (first.get("protocol") or {}).get("text", ""),
        "status": "ok" if len(ok) == len(seeds) else "failed" if any(r["job"] for r in runs.values()) else "missing",
        "error": next((r["job"].get("error", "") for r in runs.values() if r["job"]), ""),
    }


def _chars(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def check_comparable(rows: list[dict]) -> tuple | None:
    """Figures scored on different characters do not rank: a partial figure (results.json `partial`: the
    first N of the M val characters, eval.final_max_chars) against a whole one, or partial ones on different
    N, is refused in one line (ConfigError). A results.json without `partial` is whole. Returns the common
    (N, M) when every run is partial, else None."""
    runs = {f"{r['model']}-{s}": v for r in rows for s, v in r["partial_by_seed"].items()}
    partial = {k: v for k, v in runs.items() if v is not None}
    whole = [k for k, v in runs.items() if v is None]
    if not partial:
        return None
    name, (scored, total) = next(iter(partial.items()))
    if whole:
        raise ConfigError(f"{name}/results.json: a partial figure ({_chars(scored)} of {_chars(total)} val "
                          f"characters, eval.final_max_chars) cannot be ranked against whole ones "
                          f"({', '.join(whole[:3])}{', ...' if len(whole) > 3 else ''}); score every run alike")
    other = next(((k, v) for k, v in partial.items() if v[0] != scored), None)
    if other is not None:
        raise ConfigError(f"{other[0]}/results.json: scored {_chars(other[1][0])} val characters, {name} "
                          f"{_chars(scored)} (eval.final_max_chars): partial figures rank only on the same characters")
    return scored, total


def leaderboard(out: Path, models: list[str], seeds: list[int]) -> list[dict]:
    """Rows best mean val bpc first, each with its paired difference to the leader (the first row). Partial
    figures against whole ones are refused (`check_comparable`)."""
    rows = sorted((run_row(out, m, seeds) for m in models),
                  key=lambda r: (r["best_val_bpc"] is None, r["best_val_bpc"] or 0.0))
    partial = check_comparable(rows)
    for r in rows:
        r["partial"] = partial
    leader = rows[0] if rows and rows[0]["best_val_bpc"] is not None else None
    for r in rows:
        p = paired_difference(r["bpc_by_seed"], leader["bpc_by_seed"] if leader else {})
        agrees = ("" if not p["n"] else "leader" if r is leader else ONE_SEED if p["n"] < 2
                  else "yes" if p["agree"] else "no")
        r.update({"vs_leader": p["mean"], "vs_leader_se": p["se"], "vs_leader_low": p["low"],
                  "vs_leader_high": p["high"], "vs_leader_p": p["p"] if r is not leader else None,
                  "paired_seeds": p["n"], "sign_agrees": agrees})
    for r, adjusted in zip(rows, holm([r["vs_leader_p"] for r in rows])):  # the leader's own row: no test
        r["vs_leader_p_holm"] = adjusted
        r["vs_leader_mark"] = "*" if adjusted is not None and adjusted < 1 - LEVEL else ""
    return rows


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


def vs_leader_cell(r: dict) -> str:
    """'+0.0412 ± 0.0050 (+0.0197 to +0.0627) *', '+0.0100 ± 0 (no spread)', 'leader', 'n/a (1 seed)' or ''
    (no finished run)."""
    if r["sign_agrees"] in ("", "leader", ONE_SEED):
        return r["sign_agrees"]
    if r["vs_leader_low"] is None:
        return f"{r['vs_leader']:+.4f} ± 0 (no spread)"
    return (f"{r['vs_leader']:+.4f} ± {r['vs_leader_se']:.4f} ({r['vs_leader_low']:+.4f} to "
            f"{r['vs_leader_high']:+.4f})" + (" *" if r["vs_leader_mark"] else ""))


def partial_line(rows: list[dict]) -> str:
    """When every run scored only part of the val split (eval.final_max_chars): say so, with N of M."""
    partial = rows[0].get("partial") if rows else None
    if partial is None:
        return ""
    return (f"**Partial figures**: every run's val bpc scored the first {_chars(partial[0])} of "
            f"{_chars(partial[1])} val characters (eval.final_max_chars), not the whole split.\n\n")


def overhead_line(rows: list[dict]) -> str:
    """Mean seconds per run outside the budget: start-up, the exact evaluation, the context curve."""
    names = {"startup_seconds": "start-up", "final_eval_seconds": "exact evaluation",
             "context_seconds": "context curve"}
    said = [f"{name} {v:.1f} s" for k, name in names.items() if (v := _mean(r[k] for r in rows)) is not None]
    return f"Outside the budget, per run on average: {', '.join(said)}.\n\n" if said else ""


def markdown(rows: list[dict], cfg: DictConfig, seeds: list[int]) -> str:
    """leaderboard.md: what was compared, on what machine and when, then the table and its footnote."""
    b, sd = cfg.budget, len(seeds) > 1
    budget = (f"{b.seconds:g} s of wall time per run (validations included; the LR decays to its floor at the end)"
              if b.seconds is not None else f"{b.tokens:,} training tokens per run")
    text = (f"# charlm.compare\n\nBudget: {budget}, {b.evals} validations. Recipes: `{Path(str(cfg.recipes)).stem}`. "
            f"Seeds: {', '.join(map(str, seeds))}{' (mean ± sd; paired: every model ran every seed)' if sd else ''}. "
            f"{machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.\n\nval bpc: the best checkpoint on "
            "the yardstick (every val character scored once, `protocol`); window loss: nanoGPT-style, random windows "
            "(length in brackets) from an empty state; time to best: wall seconds (training and earlier validations) "
            "to the best weights.\n\n" + partial_line(rows) + overhead_line(rows))
    head = ["model", "params", "train tok/s", "val bpc" + (" ± sd" if sd else ""), "Δ vs leader ± SE (95% interval)",
            "signs agree", "effective context (chars)", "val loss (nats)", "window loss (nats)", "s to best",
            "tokens to best", "steps"] + (["seeds"] if sd else []) + ["protocol"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        bpc = _fmt(r["best_val_bpc"]) + (f" ± {_fmt(r['best_val_bpc_sd'])}" if sd and r["best_val_bpc_sd"] else "")
        window = f"{_fmt(r['window_val_loss'])} ({r['window']})" if r["window_val_loss"] is not None else ""
        agree = r["sign_agrees"] if r["sign_agrees"] in (ONE_SEED, "yes", "no") else ""
        cells = [r["model"], _fmt(r["params"]), _fmt(r["tokens_per_s"], 0), bpc or r["status"], vs_leader_cell(r),
                 agree, r["context_cell"], _fmt(r["best_val_loss"]), window,
                 _fmt(r["seconds_to_best"], 1), _fmt(r["tokens_to_best"], 0), _fmt(r["steps"], 0)] + \
                ([r["seeds"]] if sd else []) + [r["protocol"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [f"\n- {r['model']}: {r['status']}: {r['error']}" for r in rows if r["error"]]
    return text + "\n".join(lines) + f"\n\n{footnote(rows, len(seeds))}\n"


def band(curves: list[list[dict]], x: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean, min, max) of val bpc over seeds, point i of every seed together (validations fall at the same
    fractions of the budget); x is the seeds' mean at each point. Only the points every seed reached."""
    n = min((len(c) for c in curves), default=0)
    cols = [[c[i] for c in curves] for i in range(n)]
    return ([statistics.fmean(p[x] for p in col) for col in cols],
            [statistics.fmean(p["val_bpc"] for p in col) for col in cols],
            [min(p["val_bpc"] for p in col) for col in cols], [max(p["val_bpc"] for p in col) for col in cols])


def plot_curves(out: Path, models: list[str], seeds: list[int], x: str = "seconds") -> None:
    """curves.png: each model's mean val bpc over seeds, with the min-max band, against wall seconds (or tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, m in enumerate(models):
        curves = [[p for p in read_json(out / f"{m}-{s}" / "curve.json").get("points", []) if p["val_bpc"] is not None]
                  for s in seeds]
        xs, mean, lo, hi = band([c for c in curves if c], x)
        style = {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}
        ax.plot(xs, mean, marker=".", label=m, **style)
        ax.fill_between(xs, lo, hi, alpha=0.2, color=style["color"], linewidth=0)
    ax.set_xlabel("wall seconds (training and validation)" if x == "seconds" else "training tokens")
    ax.set_ylabel("val bpc (in-training validation)" + (f"; mean, min-max over {len(seeds)} seeds" if len(seeds) > 1
                                                        else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "curves.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, cfg: DictConfig, models: list[str], seeds: list[int]) -> None:
    """leaderboard.csv, leaderboard.md and curves.png in `out`."""
    rows = leaderboard(out, models, seeds)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "leaderboard.csv", buf.getvalue())
    write_atomic(out / "leaderboard.md", markdown(rows, cfg, seeds))
    plot_curves(out, models, seeds, "seconds" if cfg.budget.seconds is not None else "tokens")
