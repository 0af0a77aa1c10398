"""`make bench`'s tables: the results dict of scripts/bench.py as markdown, written beside its JSON, and the
ratio that moved most since a previous results file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from charlm.bench.child import BETAS, CLIP, LR
from charlm.bench.window import CUDA

MODES = ("random", "stream")  # how training batches are drawn: random windows, or contiguous streams


def fmt(v, digits: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def lowest_ratio(res: dict) -> tuple[float, str] | None:
    pairs = [(m["ratio"], f"{name} {mode}") for name, r in res["models"].items() for mode, m in r["modes"].items()]
    return min(pairs) if pairs else None


def ratios_of(res: dict) -> dict[str, float]:
    """{"MODEL MODE": charlm/bare ratio} of a results file (older files without modes give none)."""
    return {f"{n} {mode}": m["ratio"] for n, r in res.get("models", {}).items()
            for mode, m in (r.get("modes") or {}).items()}


def largest_change(before: dict, after: dict) -> dict | None:
    """The ratio that moved most since `before` (a previous results file): what, before, after, change."""
    old, new = ratios_of(before), ratios_of(after)
    common = [(abs(new[k] - old[k]), k) for k in new if k in old]
    if not common:
        return None
    k = max(common)[1]
    return {"date": before.get("date"), "what": k, "before": old[k], "after": new[k], "change": new[k] - old[k]}


def table(res: dict) -> str:
    def mem(side):
        if side is None:
            return "-"
        return fmt(side.get("cuda_peak_mb")) if CUDA else f"{fmt(side['peak_rss_mb'])} (+{fmt(side['rss_growth_mb'])})"

    def nocache(s, key):
        if "recompute_chars" not in s:
            return "-"
        return f"{fmt(s[key + '_recompute_chars_per_s'])} ({s[key + '_cache_speedup']:.1f}x)"

    m = "CUDA peak MB" if CUDA else "peak RSS MB (growth)"
    lines = [f"## charlm bench: {res['machine']}, {res['date']}", "",
             f"{res['device']}, torch {res['torch']}, {res['threads']} threads, preset {res['preset']}: "
             f"{res['steps']} training steps per side, the last {res['steps'] - res['warmup']} timed; the two sides "
             f"run at once taking turns slice by slice ({res.get('slices', 12)} slices each), the ratio of each run "
             f"the trimmed mean over its slices of each one against its neighbours in time, "
             f"{res['repeats']} runs, their median; batch {res['settings']['batch_size']} x "
             f"{res['settings']['block_size']} chars; "
             f"AdamW lr {LR:g}, betas {BETAS}, no weight decay, clip norm {CLIP:g}, no schedule, on both sides.", "",
             "Training tokens/s, charlm / bare loop (target: >= 0.95 in every mode):", "",
             "| model | params | precision | " + " | ".join(
                 f"{mode} charlm | {mode} bare | {mode} charlm/bare" for mode in MODES) + " |",
             "|---" * (3 + 3 * len(MODES)) + "|"]
    for name, r in res["models"].items():
        cells = []
        for mode in MODES:
            x = r["modes"].get(mode)
            cells += ([fmt(x["charlm"]["tokens_per_s"]), fmt(x["bare"]["tokens_per_s"]), f"{x['ratio']:.2f}"]
                      if x else ["-", "-", "-"])
        lines.append(f"| {name} | {fmt(r['params'])} | {r['precision']} | " + " | ".join(cells) + " |")
    spreads = [f"{n} {mode} {min(m['ratios']):.2f}-{max(m['ratios']):.2f}" for n, r in res["models"].items()
               for mode, m in r["modes"].items() if len(m.get("ratios", [])) > 1]
    if spreads:
        lines += ["", "Spread of the per-repeat ratios (min-max): " + ", ".join(spreads) + "."]
    if p := res.get("previous"):
        lines += ["", f"Largest change against the previous run ({p['date']}): {p['what']} {p['before']:.2f} -> "
                  f"{p['after']:.2f} ({p['change']:+.2f})."]
    if low := lowest_ratio(res):
        lines += ["", f"Lowest ratio: {low[0]:.2f} ({low[1]}): target {'met' if low[0] >= 0.95 else 'NOT met'}."]
    if res.get("skipped"):
        lines += ["", "Not run (time budget): " + ", ".join(res["skipped"]) + "."]
    lines += ["", f"Memory over the timed steps, {m}:", "", "| model | " + " | ".join(
        f"{mode} charlm | {mode} bare" for mode in MODES) + " |", "|---" * (1 + 2 * len(MODES)) + "|"]
    for name, r in res["models"].items():
        cells = []
        for mode in MODES:
            x = r["modes"].get(mode) or {}
            cells += [mem(x.get("charlm")), mem(x.get("bare"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    syncs = [f"{n} {mode} {x['charlm']['host_syncs_per_step']:.1f}" for n, r in res["models"].items()
             for mode, x in r["modes"].items() if "host_syncs_per_step" in x["charlm"]]
    if syncs:
        lines += ["", "charlm host syncs per training step (after the window): " + ", ".join(syncs)]
    lines += ["", f"Sampling (charlm.generate, untrained weights, {res['sample_chars']} chars; no-cache: "
              f"{res['recompute_chars']} chars):", "",
              "| model | 1x chars/s | 64x chars/s | no-cache 1x chars/s (cache speedup) "
              "| no-cache 64x chars/s (cache speedup) |", "|---" * 5 + "|"]
    for name, r in res["models"].items():
        s = r["sampling"]
        lines.append(f"| {name} | {fmt(s['single_chars_per_s'])} | {fmt(s['batch64_chars_per_s'])} "
                     f"| {nocache(s, 'single')} | {nocache(s, 'batch64')} |")
    if res.get("scans"):
        lines += ["", f"charlm's scans (compiled C loops on a CPU, `charlm/models/kernels.c`) vs a Python loop "
                  f"over time (forward + backward, median of {res['scan_repeats']}, the two taking turns;"
                  " blocks at conf/model sizes):", "", "| what | shape | charlm ms | loop ms | speed-up |",
                  "|---" * 5 + "|"]
        lines += [f"| {s['what']} | {s['shape']} | {s['parallel_ms']:.2f} | {s['loop_ms']:.2f} | {s['speedup']:.1f}x |"
                  for s in res["scans"]]
    if res.get("explain"):
        lines += ["", "charlm.explain, two 1x384 LSTMs on the first val characters (wall time, start-up included): "
                  + ", ".join(f"{e['chars']:,} chars {e['seconds']:.1f} s" for e in res["explain"]) + "."]
    for key, unit in (("data", "characters"), ("data_bytes", "bytes (data.unit=byte)")):
        if d := res.get(key):
            lines += ["", f"Data, as {unit}: a {d['mb']:g} MB corpus through CharDataModule.prepare() in "
                      f"{d['encode_s']:.2f} s ({d['mb_per_s']:.1f} MB/s, peak RSS {d['peak_rss_mb']:.0f} MB, "
                      f"+{d['rss_growth_mb']:.0f} MB); prepared again in {d['prepare_again_s']:.2f} s; ids "
                      f"memory-mapped: {'yes' if d['memory_mapped'] else 'no'}."]
    if g := res.get("large_corpus"):  # scripts/bench_corpus.py: each run a fresh process, its own peak
        e, c, t = g["encode"], g["cached"], g.get("train")
        train = (f"; charlm.train on it starts in {t['startup_s']:.1f} s, peak RSS {t['peak_rss_mb']:,.0f} MB"
                 if t else "")
        lines += ["", f"A {g['mb']:,.0f} MB corpus ({g['unit']}s, scripts/bench_corpus.py): encoded in "
                  f"{e['prepare_s']:.1f} s ({e['mb_per_s']:.1f} MB/s), peak RSS {e['peak_rss_mb']:,.0f} MB; "
                  f"a cached run prepared in {c['prepare_s']:.2f} s, its first batch {c['first_batch_s']:.1f} s "
                  f"after start, peak RSS {c['peak_rss_mb']:,.0f} MB{train} (bound for 1 GB: {g['bound_mb']:,} MB)."]
    return "\n".join(lines) + "\n"


def write(res: dict, out: Path) -> str:
    """OUT/results-MACHINE.{json,md}, each replaced atomically."""
    md = table(res)
    out.mkdir(parents=True, exist_ok=True)
    for ext, text in (("json", json.dumps(res, indent=2) + "\n"), ("md", md)):
        tmp = out / f"results-{res['machine']}.{ext}.tmp"
        tmp.write_text(text)
        os.replace(tmp, tmp.with_suffix(""))
    return md
