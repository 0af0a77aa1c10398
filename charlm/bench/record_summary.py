"""What scripts/record.py writes about a record: the machine's name and fingerprint (machine.json), record.md
(each part's wall time and headline figures), and a budget recipe's row in docs/cpu_record.md."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
from pathlib import Path


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """The cores this process may run on (what a training run gets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_slug(model: str | None = None, n: int | None = None) -> str:
    """'AMD EPYC 9B14', 2 cores -> 'amd-epyc-9b14-2c': the CPU model without trademarks, clock and 'CPU'."""
    s = (model if model is not None else cpu_model()).lower()
    s = re.sub(r"\((r|tm)\)|@.*$|\b\d+-core\b|\bprocessor\b|\bcpu\b", " ", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "cpu"
    return f"{s}-{n if n is not None else cores()}c"


def fingerprint(rec: Path, day: str) -> dict:
    """machine.json: enough to set two machines' records side by side."""
    import torch

    calib = read_json(rec / "calibration" / "calibration.json") or {}
    return {"machine": machine_slug(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cores_usable": cores(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "date": day,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "calibration_tokens_per_s": calib.get("tokens_per_s"),
            "calibration": {k: calib[k] for k in ("cell", "layers", "hidden", "emb", "batch", "seq") if k in calib}}


def num(v, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def wall(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def yardstick(r: dict) -> str:
    return f"{num(r.get('best_val_loss'))} / {num(r.get('best_val_bpc'))}"


def demote(md: str) -> str:
    """A part's own Markdown under record.md's headings: its headings one level lower."""
    return re.sub(r"^(#+) ", r"#\1 ", md.strip(), flags=re.M)


def part_rows(rec: Path, recipes: tuple[str, ...]) -> dict[str, tuple[str, list[str]]]:
    """Each part found in the folder: (headline, detail lines)."""
    out = {}
    if c := read_json(rec / "calibration" / "calibration.json"):
        out["calibration"] = (f"{c['tokens_per_s']:,.0f} tokens/s (bare {c['cell'].upper()} "
                              f"{c['layers']}x{c['hidden']}, batch {c['batch']} x {c['seq']})", [])
    if r := read_json(rec / "train" / "results.json"):
        out["train"] = (f"yardstick {yardstick(r)} (nats / bpc), {r['steps']:,} steps, "
                        f"{num(r.get('train_seconds'), '.0f')} s training", [])
    budgets = {n: r for n in recipes if (r := read_json(rec / "budgets" / f"{n}.json"))}
    if budgets:
        out["budgets"] = ("; ".join(f"{n}: {yardstick(r)}, {r['steps']:,} steps" for n, r in budgets.items()), [
            "| recipe | yardstick (nats / bpc) | nanoGPT-style (nats) | steps | training s |", "|---|---|---|---|---|",
            *(f"| experiment={n} | {yardstick(r)} | {num(r.get('window_val_loss'))} | {r['steps']:,} | "
              f"{num(r.get('train_seconds'), '.0f')} |" for n, r in budgets.items())])
    if (lb := rec / "compare" / "leaderboard.md").exists():
        rows = list(csv.DictReader((rec / "compare" / "leaderboard.csv").open()))
        best = rows[0] if rows else {}
        bpc = num(float(best["best_val_bpc"])) if best.get("best_val_bpc") else "-"
        out["compare"] = (f"best of {len(rows)} models: {best.get('model', '-')} at {bpc} bpc",
                          [demote(lb.read_text()), "", "![curves](compare/curves.png)"])
    if (rec / "report" / "REPORT.md").exists():
        span = (read_json(rec / "report" / "memory_span.json") or {}).get("models", {})
        spans = [f"{m} {r['span'].get('0.9') or 'none'}" for m, r in span.items() if isinstance(r.get("span"), dict)]
        out["report"] = ("memory span (longest lag at accuracy >= 0.9): " + ", ".join(spans) if spans
                         else "REPORT.md written", [
            "[report/REPORT.md](report/REPORT.md): " + ", ".join(
                f"![{p.stem}](report/{p.name})" for p in sorted((rec / "report").glob("*.png")))])
    if bench_md := sorted((rec / "bench").glob("results-*.md")):
        text = bench_md[0].read_text()
        low = re.search(r"^Lowest ratio: .*$", text, flags=re.M)
        out["bench"] = (low.group(0) if low else "written", [demote(text)])
    return out


def mixed_calibrations(rec: Path, parts: tuple[str, ...], tolerance: float = 0.10) -> str | None:
    """A sentence when the folder's parts were measured at calibrations more than `tolerance` apart (a part
    rerun on another machine, or the same machine much slower that day); None when they agree."""
    seen = {p: c for p in parts if (c := (read_json(rec / p / "part.json") or {}).get("calibration_tokens_per_s"))}
    if not seen or max(seen.values()) <= (1 + tolerance) * min(seen.values()):
        return None
    return ("these parts were measured at different calibrations (" + ", ".join(
        f"{p} {c:,.0f}" for p, c in seen.items()) + " tokens/s): set figures side by side only within one "
        "calibration, or measure every part again (make record FORCE=1)")


def write_record_md(rec: Path, parts: tuple[str, ...], recipes: tuple[str, ...], failed: list[str]) -> None:
    """record.md: one row per part (wall time, headline), the total, then each part's tables."""
    m = read_json(rec / "machine.json") or {}
    rows, total = part_rows(rec, recipes), 0.0
    md = [f"# charlm record: {m.get('machine')}, {m.get('date')}", "",
          f"{m.get('cpu_model')}, {m.get('cores_usable')} usable cores of {m.get('cpu_count')}, "
          f"{m.get('torch_threads')} torch threads, torch {m.get('torch')}, Python {m.get('python')}, "
          f"{m.get('platform')}. Calibration (bare PyTorch LSTM loop): "
          f"{num(m.get('calibration_tokens_per_s'), ',.0f')} tokens/s. Written by `make record`, one process at a "
          "time.", "", "| part | wall | headline figures |", "|---|---|---|"]
    for part in parts:
        done = read_json(rec / part / "part.json")
        if part in failed:
            md.append(f"| {part} | failed | - |")
        elif done:
            total += done["seconds"]
            md.append(f"| {part} | {wall(done['seconds'])} | {rows.get(part, ('-',))[0]} |")
    md += ["", f"Total: {wall(total)}.", ""]
    if mixed := mixed_calibrations(rec, parts):
        md += [f"Note: {mixed}.", ""]
    for part in parts:
        if part in rows and rows[part][1]:
            md += [f"## {part}", "", *rows[part][1], ""]
    write_atomic(rec / "record.md", "\n".join(md).rstrip() + "\n")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def recipe_budget(root: Path, name: str) -> str:
    """conf/experiment/NAME.yaml's budget, as a table cell."""
    from omegaconf import OmegaConf

    path = root / "conf" / "experiment" / f"{name}.yaml"
    b = OmegaConf.load(path).get("budget") if path.exists() else None
    if b and b.get("seconds") is not None:
        return f"{b.seconds:g} s training"
    if b and b.get("tokens") is not None:
        return f"{b.tokens:,} tokens"
    return "-"


def append_cpu_record(doc: Path, rec: Path, recipes: tuple[str, ...], root: Path) -> None:
    """One row per budget recipe the record ran, appended to the attempts table of docs/cpu_record.md (the
    table whose header starts '| recipe |'; a new one at the end when there is none)."""
    m = read_json(rec / "machine.json") or {}
    calib = read_json(rec / "calibration" / "calibration.json") or {}
    walls = {s["label"]: s["seconds"] for s in (read_json(rec / "budgets" / "part.json") or {}).get("steps", [])}
    new = []
    for name in recipes:
        r = read_json(rec / "budgets" / f"{name}.json")
        if r:
            run = f" (wall {walls[name]:.0f} s)" if name in walls else ""
            new.append(f"| `experiment={name}`{run} | {recipe_budget(root, name)} | {yardstick(r)} | "
                       f"{num(r.get('window_val_loss'))} | {num(calib.get('tokens_per_s'), ',.0f')} | "
                       f"{m.get('machine') or machine_slug()} | {m.get('date') or rec.name} |")
    lines = doc.read_text().splitlines() if doc.exists() else []
    start = next((i for i, line in enumerate(lines) if line.startswith("| recipe |")), None)
    if start is None:
        lines += ["", "| recipe | budget | yardstick (nats / bpc) | nanoGPT-style (nats) | calibration tok/s | "
                  "machine | date |", "|---|---|---|---|---|---|---|"]
        start = len(lines) - 2
    end = start
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    lines[end + 1:end + 1] = new
    write_atomic(doc, "\n".join(lines) + "\n")
