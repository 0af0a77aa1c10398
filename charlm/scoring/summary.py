"""Sweep summaries: SWEEP_DIR/summary.csv and summary.md, one row per job, best yardstick bpc first
(every job scored by the same yardstick, its protocol in a column).

Rows come from each job's `results.json` (and, for a job that wrote none, the `job.json` status
record its end left behind); logs are never parsed. `SweepSummary` is the Hydra callback that
keeps the summary of a multirun up to date:

    hydra:
      callbacks:
        summary:
          _target_: charlm.scoring.summary.SweepSummary

Hydra 1.3's basic sweeper runs every job of a batch, then re-raises the first failed job's
exception: the jobs of later batches never run and `on_multirun_end` is never called. So the
summary is rewritten after every job (`on_job_end`), and with `keep_going` (the default) a failed
job is recorded and handed back to Hydra as done, so the sweep runs to its end, prints the
table and then exits with status 1.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from charlm.atomic import write_atomic, write_json
from charlm.cli import error_line, user_error_types

log = logging.getLogger(__name__)
COLUMNS = ["job", "status", "best_val_bpc", "best_val_loss", "protocol", "window_val_loss", "steps", "params",
           "tokens_per_s", "model", "overrides", "error"]
ORDER = {"ok": 0, "pruned": 1, "failed": 2, "interrupted": 3, "running": 4}


def _rank_zero() -> bool:
    """False in the extra processes of a multi-process job (DDP ranks, SLURM tasks)."""
    return all(int(os.environ.get(v, 0) or 0) == 0 for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Folders under `sweep_dir` that belong to one job: they hold results.json or job.json."""
    found = {p.parent for name in ("results.json", "job.json") for p in sweep_dir.rglob(name)}
    return sorted(found)


def job_row(job_dir: Path, sweep_dir: Path) -> dict:
    """One summary row: metrics from results.json, status and error from job.json."""
    info = json.loads((job_dir / "job.json").read_text()) if (job_dir / "job.json").exists() else {}
    results = json.loads((job_dir / "results.json").read_text()) if (job_dir / "results.json").exists() else {}
    status = info.get("status") or ("ok" if results else "running")
    if status == "ok" and not results:
        status = "failed"  # the task returned but wrote no results
    row = {k: results.get(k) for k in COLUMNS if k in results}
    if isinstance(row.get("protocol"), dict):  # the yardstick's protocol, so a reader sees what was compared
        row["protocol"] = row["protocol"].get("text", "")
    row |= {
        "job": str(job_dir.relative_to(sweep_dir)),
        "status": status,
        "overrides": " ".join(info.get("overrides", [])),
        "error": info.get("error", ""),
    }
    return row


def _sort_key(row: dict):
    bpc = row.get("best_val_bpc")
    bpc = bpc if isinstance(bpc, (int, float)) and math.isfinite(bpc) else math.inf
    job = row["job"]
    return ORDER.get(row["status"], 9), bpc, (int(job) if job.isdigit() else math.inf), job


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    """A markdown table; overrides shared by every job are stated once above it, not in each row."""
    split = [r["overrides"].split() for r in rows]
    common = set.intersection(*map(set, split)) if split else set()
    shared = [o for o in (split[0] if split else []) if o in common]
    cols = [c for c in COLUMNS if any(r.get(c) not in (None, "") for r in rows) or c in ("job", "status")]
    out = io.StringIO()
    if shared:
        out.write(f"All jobs: `{' '.join(shared)}`\n\n")
    out.write("| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n")
    for r, ovr in zip(rows, split):
        cells = {**r, "overrides": " ".join(o for o in ovr if o not in common)}
        out.write("| " + " | ".join(_fmt(cells.get(c)).replace("|", "\\|") for c in cols) + " |\n")
    return out.getvalue()


def write_summary(sweep_dir: str | Path) -> list[dict]:
    """(Re)write SWEEP_DIR/summary.csv and summary.md from the jobs found there; return the rows, best first."""
    sweep_dir = Path(sweep_dir)
    rows = sorted((job_row(d, sweep_dir) for d in job_dirs(sweep_dir)), key=_sort_key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for name, text in (("summary.csv", buf.getvalue()), ("summary.md", markdown(rows))):
        write_atomic(sweep_dir / name, text)
    return rows


class SweepSummary(Callback):
    """Hydra callback: record each multirun job's status, keep SWEEP_DIR/summary.{csv,md} current."""

    def __init__(self, keep_going: bool = True):
        self.keep_going = keep_going

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN or not _rank_zero():
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        info = {"num": int(config.hydra.job.num), "overrides": list(job_return.overrides or []), "status": "ok"}
        if job_return.status == JobStatus.FAILED:
            exc = job_return._return_value
            info |= {"status": "failed", "error": error_line(exc)}
            if not isinstance(exc, user_error_types()):  # a bug, not a bad value: keep its traceback
                log.error(f"job {info['num']} failed", exc_info=exc)
            if self.keep_going:  # the basic sweeper would re-raise it and stop the sweep
                job_return.status, job_return.return_value = JobStatus.COMPLETED, None
            finish_wandb()
        write_json(job_dir / "job.json", info)
        write_summary(config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        if not _rank_zero():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        print(f"\n{markdown(rows)}\nsummary: {sweep_dir / 'summary.md'} ({len(rows)} jobs)")
        failed = sum(r["status"] == "failed" for r in rows)  # jobs may have run in other processes
        if failed:
            print(f"error: {failed} of {len(rows)} jobs failed (see the summary)", file=sys.stderr)
            sys.exit(1)


def finish_wandb() -> None:
    """Close a W&B run a failed job left open, so the next job does not log into it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1)
