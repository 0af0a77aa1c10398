"""The dynamic-evaluation column charlm.compare adds with `dynamic=true`: each run's best checkpoint scored on
the val split by dynamic evaluation (charlm.scoring.dynamic) into DIR/MODEL-SEED/dynamic.json, then
DIR/dynamic.md and DIR/dynamic.csv: per model, the static and dynamic val bpc on the same stream and the gain
(dynamic minus static) seed by seed, with the leaderboard's paired interval (charlm.scoring.leaderboard)."""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from charlm import cli
from charlm.atomic import write_atomic, write_json
from charlm.config import check_keys
from charlm.errors import ConfigError
from charlm.scoring.dynamic import DynamicConfig, check_dynamic, evaluate_dynamic
from charlm.scoring.leaderboard import paired_difference, read_json
from charlm.scoring.significance import LEVEL, holm

COLUMNS = ["model", "static_bpc", "dynamic_bpc", "gain", "gain_se", "gain_low", "gain_high", "gain_p_holm",
           "gain_mark", "paired_seeds", "lr", "decay", "protocol"]


def pack_dynamic(argv: list[str]) -> list[str]:
    """compare's `dynamic.KEY=VALUE` arguments (charlm.evaluate's keys) gathered into `dynamic_args=[...]`, so a
    comparison takes them as charlm.evaluate does."""
    own = [a for a in argv if a.startswith("dynamic.")]
    if not own:
        return argv
    quoted = ",".join("'" + a.replace("'", "\\'") + "'" for a in own)
    return [a for a in argv if a not in own] + [f"dynamic_args=[{quoted}]"]


def dynamic_settings(args: list[str]) -> DictConfig:
    """compare's `dynamic_args` (charlm.evaluate's `dynamic.KEY=VALUE` overrides) over the defaults, checked."""
    if bad := [a for a in args if not a.startswith("dynamic.") or "=" not in a]:
        raise ConfigError(f"dynamic_args: {bad[0]!r}: each must be dynamic.KEY=VALUE (charlm.evaluate's dynamic keys)")
    d = check_keys(OmegaConf.from_dotlist([a[len("dynamic."):] for a in args] + ["enabled=true"]), DynamicConfig,
                   "dynamic.")
    check_dynamic(d)
    return d


def measure_dynamic(folder: Path, train_cfg: DictConfig, args: list[str]) -> bool:
    """The best checkpoint's static and dynamic val figures on one stream into folder/dynamic.json (kept when
    it was measured with the same `args`); False (and one line) if it cannot be measured."""
    from charlm.checkpoint import load_model
    from charlm.training.build import build_data

    if read_json(folder / "dynamic.json").get("args") == list(args):
        return True
    d = dynamic_settings(args)
    best = folder / "checkpoints" / Path(read_json(folder / "results.json").get("best_ckpt") or "last.ckpt").name
    try:
        model, vocab, _ = load_model(best)
        splits = build_data(train_cfg, vocab).splits
        gpu = torch.cuda.is_available() and str(train_cfg.trainer.get("accelerator")) in ("gpu", "cuda", "auto")
        device = "cuda" if gpu else "cpu"
        val, tune = splits["val"], None
        if d.tune:  # tuned on the start of val, scored on the rest
            val, tune = val[d.tune_chars :], val[: d.tune_chars + 1]
        t0 = time.perf_counter()
        out = evaluate_dynamic(model.to(device), val, d, splits["train"], tune, int(train_cfg.seed), device)
        seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a failed measurement leaves the column empty, not the comparison
        print(f"error: {folder.name}: dynamic evaluation: {cli.error_line(e)}", file=sys.stderr)
        return False
    write_json(folder / "dynamic.json", dict(out, args=list(args), checkpoint=best.name, seconds=round(seconds, 3)))
    print(f"charlm.compare: {folder.name}: dynamic evaluation {out['static_bpc']:.4f} -> {out['dynamic_bpc']:.4f} "
          f"val bpc ({seconds:.1f} s)")
    return True


def dynamic_rows(out: Path, models: list[str], seeds: list[int]) -> list[dict]:
    """One row per model: mean static and dynamic bpc over its seeds, the paired gain (dynamic - static), its
    95% interval, and * where the gain survives Holm's correction across the models."""
    rows = []
    for m in models:
        runs = {s: read_json(out / f"{m}-{s}" / "dynamic.json") for s in seeds}
        runs = {s: r for s, r in runs.items() if r.get("dynamic_bpc") is not None}
        static = {s: r["static_bpc"] for s, r in runs.items()}
        dynamic = {s: r["dynamic_bpc"] for s, r in runs.items()}
        p = paired_difference(dynamic, static)
        first = next(iter(runs.values()), {})
        settings = [r["settings"] for r in runs.values()]  # tuned: each seed's own choice
        one = p["n"] == 1  # one seed: its gain, no interval
        rows.append({"model": m, "static_bpc": statistics.fmean(static.values()) if static else None,
                     "dynamic_bpc": statistics.fmean(dynamic.values()) if dynamic else None,
                     "gain": next(iter(dynamic.values())) - next(iter(static.values())) if one else p["mean"],
                     "gain_se": p["se"], "gain_low": p["low"], "gain_high": p["high"], "p": p["p"],
                     "paired_seeds": p["n"], "lr": " ".join(f"{s['lr']:g}" for s in settings),
                     "decay": " ".join(f"{s['decay']:g}" for s in settings),
                     "first_settings": first.get("settings", {}),
                     "protocol": (first.get("protocol") or {}).get("text", "")})
    for r, adjusted in zip(rows, holm([r.pop("p") for r in rows])):
        r["gain_p_holm"] = adjusted
        r["gain_mark"] = "*" if adjusted is not None and adjusted < 1 - LEVEL else ""
    return rows


def _num(v, digits: int = 4, sign: bool = False) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def dynamic_report(out: Path, models: list[str], seeds: list[int]) -> str | None:
    """DIR/dynamic.md and DIR/dynamic.csv from the runs' dynamic.json; the markdown, or None when no run has one."""
    rows = [r for r in dynamic_rows(out, models, seeds) if r["paired_seeds"]]
    if not rows:
        return None
    head = ["model", "static val bpc", "dynamic val bpc", "Δ dynamic − static ± SE", "95% interval", "seeds",
            "lr / decay (per seed)", "stream"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        gain = _num(r["gain"], sign=True) + (f" ± {_num(r['gain_se'])}" if r["gain_se"] is not None else "")
        interval = (f"{_num(r['gain_low'], sign=True)} to {_num(r['gain_high'], sign=True)}"
                    if r["gain_low"] is not None else "n/a (1 seed)" if r["paired_seeds"] == 1 else "no spread")
        lines.append(f"| {r['model']} | {_num(r['static_bpc'])} | {_num(r['dynamic_bpc'])} | {gain} {r['gain_mark']}"
                     f" | {interval} | {r['paired_seeds']} | {r['lr']} / {r['decay']} | {r['protocol']} |")
    s = rows[0]["first_settings"]
    text = ("# Dynamic evaluation\n\nEach run's best checkpoint on the val split read as one stream, scored "
            f"statically and then by dynamic evaluation (method {s.get('method')}, segment {s.get('segment')}; "
            "docs/dynamic.md): each segment scored, then one update on it. Both figures are the same stream, so "
            "the gain is like-for-like.\n\n" + "\n".join(lines) + "\n\nΔ: dynamic minus static val bpc on the "
            "same seed (negative: dynamic evaluation helps), averaged over the seeds, ± its standard error; the 95% "
            "interval by Student's t with n − 1 degrees of freedom (the paired t-test of charlm.scoring.leaderboard). "
            "* "
            "where the gain is significant at 5% after Holm's correction across the models in this table.\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "dynamic.csv", buf.getvalue())
    write_atomic(out / "dynamic.md", text)
    return text
