"""`python scripts/bench_corpus.py [--mb 1000] [--unit char|byte] [--train-steps 20] [--json FILE]`

A corpus larger than most of memory through charlm's data path. Writes a corpus of --mb MB (tiny
shakespeare repeated) into a temporary folder, then runs fresh processes one at a time, each alone:

1. encode: `CharDataModule(path=...).prepare()` with an empty cache (the one streaming pass that writes the
   ids), then what training and the final evaluation read first: random windows, streams, yardstick batches;
2. cached: the same again, the cache filled (the corpus is hashed, its ids memory-mapped);
3. train (--train-steps > 0): `python -m charlm.train` on the cached corpus for a few steps, the final
   evaluation bounded (eval.final_max_chars), as a user's first run after encoding.

For each: the peak resident memory (`ru_maxrss` of that child, from `os.wait4`; this parent imports neither
torch nor charlm, so no child inherits a large peak from it) and the child's own high-water mark (Linux's
VmHWM); for encode the throughput in MB/s; for cached and train the start (seconds to the first batch, and
charlm.train's start-up). Read the memory next to the bound for a 1 GB corpus, 1.2 GB; times are this
machine's, alone, and mean little on a shared one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "charlm" / "corpora" / "tinyshakespeare.txt"
QUIET_ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
BOUND_MB = 1200  # the peak RSS a 1 GB corpus must stay under, in the encoding run and a cached run


def write_corpus(path: Path, mb: float) -> int:
    """Tiny shakespeare repeated to `mb` MB; its size in bytes."""
    raw, left = CORPUS.read_bytes(), int(mb * 1e6)
    with open(path, "wb") as f:
        while left > 0:
            left -= f.write(raw[:left])
    return path.stat().st_size


def run(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd` alone; its wall seconds and peak RSS in MB (ru_maxrss of this very child)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **QUIET_ENV, **env}, stdout=fh,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"bench_corpus: {' '.join(cmd[:4])} ... failed ({proc.returncode}):\n" + log.read_text()[-3000:])
    kb = 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KB elsewhere
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / kb / 1024}


# ---- the children ---------------------------------------------------------------------------------

def child_data(corpus: str, unit: str, out: str, started: float) -> None:
    """prepare(), then the first training batches of both kinds and the first yardstick batches; timings."""
    import torch

    from charlm.data.datamodule import CharDataModule

    imported = time.perf_counter()
    dm = CharDataModule(path=corpus, unit=unit, block_size=256, batch_size=64)
    dm.prepare()
    prepared = time.perf_counter()
    batch = next(iter(dm.train_dataset()))
    first = time.perf_counter()
    for sampling in ("random", "stream"):
        dm.sampling = sampling
        it = iter(dm.train_dataset())
        for _ in range(50):
            batch = next(it)
    ev = dm.eval_dataset("val", final=True)
    for i in range(min(20, len(ev))):
        _ = ev[i]
    ids = dm.splits["train"]
    maps = Path("/proc/self/maps")
    mapped = None
    if maps.exists():
        ptr = ids.data_ptr()
        for line in maps.read_text().splitlines():
            parts = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= ptr < hi and len(parts) == 6:
                mapped = Path(parts[5]).name
    hwm = next((int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")),
               None) if maps.exists() else None
    Path(out).write_text(json.dumps({
        "import_s": imported - started, "prepare_s": prepared - imported, "first_batch_s": first - started,
        "ids": len(ids) + len(dm.splits["val"]) + len(dm.splits["test"]), "vocab": len(dm.vocab),
        "dtype": str(ids.dtype), "ids_file": mapped, "vm_hwm_mb": hwm, "batch": list(batch.x.shape),
        "torch": torch.__version__}))


# ---- the parent -----------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=1000, help="corpus size in MB (default 1000: 1 GB)")
    p.add_argument("--unit", choices=("char", "byte"), default="char")
    p.add_argument("--train-steps", type=int, default=20, help="steps of the charlm.train run (0: skip it)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--work", help="folder for the corpus and its cache (default: a temporary one, removed)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: CORPUS,UNIT,OUT of a measuring child
    a = p.parse_args()
    if a.child:
        corpus, unit, out = a.child.split(",")
        return child_data(corpus, unit, out, STARTED)
    work = Path(a.work or tempfile.mkdtemp(prefix="charlm-bench-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"CHARLM_CACHE": str(work / "cache")}
    try:
        corpus = work / "corpus.txt"
        size = write_corpus(corpus, a.mb)
        shutil.rmtree(work / "cache", ignore_errors=True)
        res = {"mb": size / 1e6, "unit": a.unit, "bound_mb": BOUND_MB}
        for name in ("encode", "cached"):
            out = work / f"{name}.json"
            print(f"bench_corpus: {name} ({size / 1e6:,.0f} MB, unit={a.unit}) ...", flush=True)
            res[name] = run([sys.executable, __file__, "--child", f"{corpus},{a.unit},{out}"], env,
                            work / f"{name}.log") | json.loads(out.read_text())
        res["encode"]["mb_per_s"] = size / 1e6 / res["encode"]["prepare_s"]
        if a.train_steps > 0:
            print(f"bench_corpus: charlm.train, {a.train_steps} steps on the cached corpus ...", flush=True)
            run_dir = work / "run"
            res["train"] = run([sys.executable, "-m", "charlm.train", "trainer=cpu", "logger=none", "data=text",
                                f"data.path={corpus}", f"data.unit={a.unit}", f"trainer.max_steps={a.train_steps}",
                                f"trainer.val_check_interval={a.train_steps}", "eval.max_chars=4096",
                                "eval.final_max_chars=4096", "eval.window_batches=0", "sample.n_chars=0",
                                f"hydra.run.dir={run_dir}"], env, work / "train.log")
            results = json.loads((run_dir / "results.json").read_text())
            res["train"] |= {"startup_s": results.get("startup_seconds"), "steps": results.get("steps")}
        print(report(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def report(res: dict) -> str:
    """The figures as a few lines of text."""
    e, c = res["encode"], res["cached"]
    lines = [f"corpus {res['mb']:,.1f} MB, unit={res['unit']}: {e['ids']:,} ids ({e['dtype']}, vocab {e['vocab']}), "
             f"memory-mapped from {c['ids_file'] or '?'}",
             f"encode (first run):  {e['prepare_s']:.1f} s, {e['mb_per_s']:.1f} MB/s; "
             f"peak RSS {e['peak_rss_mb']:,.0f} MB (VmHWM {e['vm_hwm_mb'] or float('nan'):,.0f} MB)",
             f"cached run:          prepared in {c['prepare_s']:.2f} s, first batch {c['first_batch_s']:.1f} s after "
             f"start ({c['import_s']:.1f} s imports); peak RSS {c['peak_rss_mb']:,.0f} MB "
             f"(VmHWM {c['vm_hwm_mb'] or float('nan'):,.0f} MB)"]
    if t := res.get("train"):
        lines.append(f"charlm.train, cached: start-up {t['startup_s']:.1f} s, {t['steps']} steps, {t['wall_s']:.1f} s "
                     f"wall; peak RSS {t['peak_rss_mb']:,.0f} MB")
    peak = max(res[k]["peak_rss_mb"] for k in ("encode", "cached", "train") if k in res)
    lines.append(f"bound for a 1 GB corpus: peak RSS under {res['bound_mb']:,} MB; highest here {peak:,.0f} MB")
    return "\n".join(lines)


STARTED = time.perf_counter()  # a child's clock starts before it imports anything heavy

if __name__ == "__main__":
    main()
