"""`python scripts/record.py [--parts calibration,train,budgets,compare,report,bench] [--force] [--preset full|tiny]`
(`make record`; PARTS=..., FORCE=1, RECORD_PRESET=tiny as environment variables do the same)

Every figure the project publishes, regenerated on this machine into results/MACHINE/DATE/, one process at a
time (each part's commands run one after the other; nothing runs beside them, so the timings are this machine's):

- calibration: the bare PyTorch loop of `make bench` (scripts/bare_loop.py) for 30 s on an LSTM 1x384, batch
  32 x 64: its tokens/s, the yardstick that sets two machines' records side by side;
- train: the default `make train`; budgets: `experiment=cpu_2min` and `experiment=cpu_5min` (each adds a row to
  docs/cpu_record.md);
- compare: `make compare` at its defaults; report: `make report` (size=cpu); bench: `make bench`.

Each part's JSON, MD and PNG files land in its folder (calibration/, train/, budgets/, compare/, report/,
bench/); run folders (checkpoints, logs) under runs/, which git ignores. machine.json fingerprints the machine,
record.md tabulates each part's wall time and headline figures. A part already in the folder (its part.json)
is skipped unless --force. `--preset tiny` runs every part at toy sizes in about a minute (tests).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path

from charlm.bench import ROOT
from charlm.bench.record_summary import (
    append_cpu_record,
    fingerprint,
    machine_slug,
    mixed_calibrations,
    read_json,
    write_json,
    write_record_md,
)

PARTS = ("calibration", "train", "budgets", "compare", "report", "bench")
BUDGET_RECIPES = ("cpu_2min", "cpu_5min")
CALIBRATION = {"cell": "lstm", "layers": 1, "hidden": 384, "emb": 64, "batch": 32, "seq": 64, "dropout": 0.1,
               "lr": 5e-3, "seconds": 30}
LOGGER = "logger=csv"  # no W&B start-up inside the timed runs; metrics.csv in each run folder

# --preset tiny: toy sizes for every part (a few steps, tiny models); its figures mean nothing
TINY_SIZES = ["data.batch_size=8", "data.block_size=16", "model.hidden_dim=32", "model.embed_dim=16",
              "eval.max_chars=3000", "eval.window_batches=1", "sample.n_chars=20"]
TINY_TRAIN = ["trainer.max_steps=6", "trainer.val_check_interval=3", *TINY_SIZES]
TINY_BUDGET = ["++budget.seconds=null", "++budget.tokens=768", "++budget.evals=2", *TINY_SIZES]  # 6 steps of 8 x 16
TINY = {
    "calibration": {"hidden": 32, "emb": 16, "batch": 8, "seq": 16, "seconds": 1},
    "compare": ["models=[rnn,lstm]", "budget.tokens=768", "budget.evals=2", "++trainer.limit_val_batches=2",
                *TINY_SIZES],
    "report": ["size=tiny", "models=[rnn,lstm]"],
    "bench": ["--preset", "tiny", "--steps", "3", "--models", "rnn", "--modes", "random", "--sample-chars", "20",
              "--encode-mb", "0", "--scan-repeats", "0", "--explain-chars", ""],
}


def commands(part: str, rec: Path, tiny: bool) -> list[tuple[str, list[str]]]:
    """(label, argv) of each command the part runs, in order. compare runs `make compare` itself, so the
    record uses whatever defaults (models, seeds, budget) the Makefile gives it."""
    py, runs = sys.executable, rec / "runs"
    if part == "calibration":
        sizes = CALIBRATION | (TINY[part] if tiny else {})
        return [("calibration", [py, "scripts/bare_loop.py", *(f"--{k}={v:g}" if isinstance(v, float) else f"--{k}={v}"
                                                               for k, v in sizes.items()),
                                 "--out", str(rec / part / "calibration.json")])]
    if part == "train":
        return [("train", [py, "-m", "charlm.train", LOGGER, *(TINY_TRAIN if tiny else []),
                           f"hydra.run.dir={runs / 'train'}"])]
    if part == "budgets":
        out = []
        for name in BUDGET_RECIPES:
            ready = (ROOT / "conf" / "experiment" / f"{name}.yaml").exists()
            if tiny:  # the recipe at a token budget (train refuses seconds under 10), or plain steps until it exists
                args = [f"experiment={name}", *TINY_BUDGET] if ready else TINY_TRAIN
            else:
                args = [f"experiment={name}"]
            out.append((name, [py, "-m", "charlm.train", LOGGER, *args, f"hydra.run.dir={runs / name}"]))
        return out
    if part == "compare":
        where = [LOGGER, f"hydra.run.dir={runs / 'compare'}"]
        if tiny:
            return [("compare", [py, "-m", "charlm.compare", *TINY[part], *where])]
        return [("compare", ["make", "--no-print-directory", "compare", f"PY={py}", "ARGS=" + " ".join(where)])]
    if part == "report":
        where = rec / "compare"  # named as REPORT.md will show it: relative to the checkout when inside it
        where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
        context = [f"context_from={where}"] if (rec / "compare" / "context.md").exists() else []
        return [("report", [py, "-m", "charlm.report", *(TINY[part] if tiny else ["size=cpu"]), *context,
                            f"out_dir={rec / 'report'}"])]
    if part == "bench":
        return [("bench", [py, "scripts/bench.py", *(TINY[part] if tiny else []), "--out", str(rec / "bench")])]
    raise ValueError(part)


def collect(part: str, rec: Path) -> None:
    """Copy the part's published files from its run folders into its own folder."""
    runs, dest = rec / "runs", rec / part
    dest.mkdir(parents=True, exist_ok=True)
    if part == "train":
        shutil.copy2(runs / "train" / "results.json", dest / "results.json")
    elif part == "budgets":
        for name in BUDGET_RECIPES:
            shutil.copy2(runs / name / "results.json", dest / f"{name}.json")
    elif part == "compare":
        for f in ("leaderboard.md", "leaderboard.csv", "curves.png", "context.png", "context.md"):
            if f.startswith("context.") and not (runs / "compare" / f).exists():  # only when contexts were measured
                continue
            shutil.copy2(runs / "compare" / f, dest / f)


def fresh_run_dirs(part: str, rec: Path, force: bool) -> None:
    """Training run folders are started afresh (a charlm run folder is never overwritten); compare's is kept
    unless --force, so an interrupted compare continues with the models it has not finished."""
    names = {"train": ["train"], "budgets": list(BUDGET_RECIPES), "compare": ["compare"] if force else []}
    for name in names.get(part, []):
        shutil.rmtree(rec / "runs" / name, ignore_errors=True)


def run_part(part: str, rec: Path, args: argparse.Namespace, env: dict) -> dict:
    """Run the part's commands one after the other; its part.json (written last) marks it done."""
    tiny = args.preset == "tiny"
    fresh_run_dirs(part, rec, args.force)
    (rec / part).mkdir(parents=True, exist_ok=True)
    steps, t_part = [], time.perf_counter()
    for label, argv in commands(part, rec, tiny):
        shown = " ".join(a if a != sys.executable else "python" for a in argv)
        print(f"\nrecord: {part}: {shown}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(argv, cwd=ROOT, env=env).returncode
        steps.append({"label": label, "command": shown, "seconds": time.perf_counter() - t0, "rc": rc})
        print(f"record: {label}: {steps[-1]['seconds']:.1f} s" + (f", failed ({rc})" if rc else ""), flush=True)
        if rc:
            return {"part": part, "failed": label, "rc": rc}
    collect(part, rec)
    calibration = read_json(rec / "calibration" / "calibration.json") or {}
    done = {"part": part, "preset": args.preset, "seconds": time.perf_counter() - t_part, "steps": steps,
            "finished": datetime.now().isoformat(timespec="seconds"),
            "calibration_tokens_per_s": calibration.get("tokens_per_s")}  # the machine's speed when it ran
    write_json(rec / part / "part.json", done)
    return done


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=os.environ.get("PARTS") or ",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all; env PARTS)")
    p.add_argument("--force", action="store_true", default=os.environ.get("FORCE", "") not in ("", "0"),
                   help="run parts already in the folder again (env FORCE=1)")
    p.add_argument("--preset", choices=["full", "tiny"], default=os.environ.get("RECORD_PRESET") or "full",
                   help="tiny: toy sizes, every file in about a minute; its figures mean nothing (env RECORD_PRESET)")
    p.add_argument("--root", default=str(ROOT / "results"), help="records go to ROOT/MACHINE/DATE (default: results)")
    p.add_argument("--date", default=date.today().isoformat(), help="the record's DATE folder (default: today)")
    p.add_argument("--cpu-record", help="the attempts log a budget row is appended to (default: docs/cpu_record.md "
                   "for the full preset, none for tiny; 'none' for none)")
    a = p.parse_args(argv)
    unknown = [x for x in a.parts.split(",") if x not in PARTS]
    if unknown or not a.parts:
        p.error(f"--parts {a.parts}: {unknown[0] if unknown else 'empty'} is not one of {','.join(PARTS)}")
    if a.preset not in ("full", "tiny"):
        p.error(f"RECORD_PRESET={a.preset}: must be full or tiny")
    if a.cpu_record is None:
        a.cpu_record = str(ROOT / "docs" / "cpu_record.md") if a.preset == "full" else "none"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    rec = Path(a.root) / machine_slug() / a.date
    (rec / "runs").mkdir(parents=True, exist_ok=True)
    (rec / "runs" / ".gitignore").write_text("*\n")  # checkpoints and logs stay out of git
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    if a.preset == "tiny":
        env.setdefault("OMP_NUM_THREADS", "1")  # toy models: OpenMP's spinning threads only slow them down
    print(f"record: {rec} (preset {a.preset})", flush=True)
    t0, ran, failed = time.perf_counter(), {}, []
    for part in (p for p in PARTS if p in a.parts.split(",")):
        if (rec / part / "part.json").exists() and not a.force:
            print(f"record: {part}: already in {rec / part}, skipped (FORCE=1 runs it again)", flush=True)
            continue
        ran[part] = run_part(part, rec, a, env)
        if "failed" in ran[part]:
            failed.append(part)
        elif part == "budgets" and a.cpu_record != "none":
            append_cpu_record(Path(a.cpu_record), rec, BUDGET_RECIPES, ROOT)
        write_json(rec / "machine.json", fingerprint(rec, a.date))  # calibration's tokens/s as soon as it is known
    write_json(rec / "machine.json", fingerprint(rec, a.date))
    write_record_md(rec, PARTS, BUDGET_RECIPES, failed)
    if mixed := mixed_calibrations(rec, PARTS):
        print(f"record: warning: {mixed}", file=sys.stderr)
    print("\nrecord: " + ", ".join(f"{p} {r.get('seconds', 0):.0f} s" + (" FAILED" if "failed" in r else "")
                                   for p, r in ran.items()) + f"; total {time.perf_counter() - t0:.0f} s")
    print(f"record: {rec / 'record.md'}, {rec / 'machine.json'}")
    if failed:
        print(f"error: {', '.join(failed)} failed (its output is above; rerun with PARTS={','.join(failed)})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
