"""`python scripts/bench.py [--preset cpu|gpu] [--models lstm,mingru] [--modes auto|random,stream] [--out DIR]`

One run on this machine, per model family and training mode: charlm's training tokens/s and peak memory
next to a bare PyTorch loop with the same architecture and settings (read the ratio, not the absolute
figures; the target is >= 0.95), sampling speed (KV cache vs full recomputation for the transformer),
the parallel scans of the modern recurrent models against a Python loop over time, and the time to
encode a large corpus. Each training side runs in a fresh process. Writes OUT/results-MACHINE.{json,md}
(rewritten after each model, so an interrupted run keeps what it measured); docs/bench.md explains them.
The children (charlm.bench.child) measure, charlm.bench.runs starts and pairs them, charlm.bench.tables writes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from charlm.bench import ROOT
from charlm.bench.child import BETAS, CLIP, CORPUS, LR  # the children's settings
from charlm.bench.runs import paired_ratio, run_child, run_pair  # the children's processes
from charlm.bench.tables import MODES, largest_change, write  # the tables
from charlm.bench.window import CUDA, SLICES, SYNC_PROBE, sync  # the timing window's

PRESETS = {  # the sizes of docs/bench.md's presets: conf/model as it is, conf/compare/gpu.yaml's, toy
    # conf/model/*.yaml as they are: what `make train` / `make compare` run on a CPU
    # 140 steps, the first 5 untimed (a CPU step is steady from the second on; no autotuning, no
    # compilation), 135 timed in 27 slices of 5 a side: 22 cases x 2 runs
    "cpu": {"data": {"block_size": 64, "batch_size": 32}, "steps": 140, "warmup": 5, "recipes": None, "sizes": {}},
    # the model sizes (and compile) of conf/compare/gpu.yaml: 3x512 RNNs with emb 128 and dropout 0.2,
    # transformer 6L/6H/384 compiled, modern models 6x384
    "gpu": {"data": {"block_size": 256, "batch_size": 64}, "steps": 200, "recipes": "gpu", "sizes": {}},
    # tests and the gpu_check dry run: every code path in seconds; its figures mean nothing
    "tiny": {"data": {"block_size": 16, "batch_size": 8}, "steps": 6, "recipes": None,
             "sizes": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1, "n_embd": 32, "n_layer": 1, "n_head": 2}},
}
SHARED = ["~scheduler", f"optim.lr={LR}", f"optim.betas=[{BETAS[0]},{BETAS[1]}]", "optim.weight_decay=0.0",
          "clip.algorithm=norm", f"clip.value={CLIP}"]
QUIET = ["logger=none", "eval.max_chars=2048", "eval.window_batches=0", "sample.n_chars=0"]  # validation negligible
FIRST = ["rnn", "lstm", "gru", "transformer", "mingru", "minlstm", "hawk", "mamba"]  # then the others, by name


# ---- sampling and scans, in this process ----------------------------------------------------

@torch.no_grad()
def recompute(model, n_chars: int, num_samples: int, window: int, g) -> None:
    """Sampling without the KV cache: re-feed the whole context (cropped to the model's window) for every char."""
    from charlm.generate import pick_next

    idx = torch.zeros(num_samples, 1, dtype=torch.long, device=next(model.parameters()).device)  # (N, 1)
    for _ in range(n_chars):
        logits, _ = model(idx[:, -window:])  # (N, <=window, V)
        idx = torch.cat([idx, pick_next(logits[:, -1], 1.0, generator=g).to(idx.device)[:, None]], 1)


def bench_sampling(model_cfg: dict, n_chars: int, recompute_chars: int) -> dict:
    """charlm.generate's chars/s (1 and 64 samples); for a windowed model also without its cache."""
    from charlm.data.vocab import CharVocab
    from charlm.generate import generate
    from charlm.models.contract import build_model, capabilities

    vocab = CharVocab.from_text(CORPUS.read_text())
    model = build_model(model_cfg, len(vocab)).to("cuda" if CUDA else "cpu").eval()
    window = capabilities(model).context_size
    g, out = torch.Generator().manual_seed(0), {"chars": n_chars}

    def rate(fn, n: int, chars: int) -> float:
        fn(n, min(chars, 8))  # warm up
        sync()
        t0 = time.perf_counter()
        fn(n, chars)
        sync()
        return n * chars / (time.perf_counter() - t0)

    for n, key in ((1, "single"), (64, "batch64")):
        out[f"{key}_chars_per_s"] = rate(lambda n, c: generate(model, vocab, "\n", c, num_samples=n, generator=g),
                                         n, n_chars)
        if window is not None:  # a windowed model (the transformer): the same without its KV cache
            r = rate(lambda n, c: recompute(model, c, n, window, g), n, recompute_chars)
            out |= {f"{key}_recompute_chars_per_s": r, f"{key}_cache_speedup": out[f"{key}_chars_per_s"] / r,
                    "recompute_chars": recompute_chars}
    return out


# ---- the parent ------------------------------------------------------------------------------

def all_models() -> list[str]:
    names = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
    return [m for m in FIRST if m in names] + [m for m in names if m not in FIRST]


def size_overrides(name: str, preset: dict) -> list[str]:
    """The preset's sizes for one model: the `model.*` and `compile` entries of its conf/compare recipe block,
    or the preset's `sizes` for the keys the model's config has."""
    from charlm.cli import compose

    keys, out = compose("train", [f"model={name}"]).model.keys(), []
    if preset["recipes"] is not None:
        import yaml

        recipes = yaml.safe_load((ROOT / "conf" / "compare" / f"{preset['recipes']}.yaml").read_text())
        for o in recipes.get(name) or []:
            key = o.lstrip("+").split("=")[0]
            if key == "compile" or (key.startswith("model.") and key[6:] in keys):
                out.append(o)
            elif key.startswith("model."):  # a recipe that names a key the model no longer has
                print(f"bench: {name}: conf/compare/{preset['recipes']}.yaml sets {key}, which conf/model/{name}.yaml "
                      "does not have: left out", flush=True)
    out += [f"model.{k}={v}" for k, v in preset["sizes"].items() if k in keys]
    return out


def model_setup(name: str, mode: str, preset: dict, steps: int) -> tuple[list[str], dict]:
    """charlm's overrides for one family in one mode, and what the bare loop needs (model config, precision)."""
    from omegaconf import OmegaConf

    from charlm.cli import compose
    from charlm.training.build import model_class_capabilities, plain, resolve_precision

    total = steps + (SYNC_PROBE if CUDA else 0)  # one validation (eval.max_chars) at the end, after the window
    overrides = [f"model={name}", f"trainer={'gpu' if CUDA else 'cpu'}", *SHARED, *QUIET, f"data.sampling={mode}",
                 *(f"data.{k}={v}" for k, v in preset["data"].items()), *size_overrides(name, preset),
                 f"trainer.max_steps={total}", f"trainer.val_check_interval={total}"]
    cfg = compose("train", overrides)
    caps = model_class_capabilities(cfg)
    bare = {"model": OmegaConf.to_container(cfg.model, resolve=True), "compile": bool(cfg.compile),
            "precision": resolve_precision(plain(cfg.trainer), caps), "preferred_sampling": caps.preferred_sampling}
    return overrides, bare


def machine_name() -> str:
    if CUDA:
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"cpu-{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}core"


def modes_for(arg: str, preferred: str) -> list[str]:
    """`auto`: random windows for every model, and streams for the models that train on them by default."""
    if arg == "auto":
        return ["random", "stream"] if preferred == "stream" else ["random"]
    return [m for m in MODES if m in arg.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if CUDA else "cpu")
    p.add_argument("--models", default="all", help="comma-separated conf/model names (default: every one)")
    p.add_argument("--modes", default="auto", help="auto (random for all, stream where the model prefers it), "
                   "or a comma-separated subset of random,stream for every model")
    p.add_argument("--steps", type=int, help="training steps per side (default: the preset's)")
    p.add_argument("--warmup", type=int,
                   help="untimed first steps (default: the preset's, else steps // 10, at least 1)")
    p.add_argument("--repeats", type=int, default=2, help="run the pair (charlm and the bare loop taking turns "
                   "slice by slice) N times, who starts alternating; report the median ratio and its spread")
    p.add_argument("--budget-s", type=float, help="start no new training run after this many seconds (the rest "
                   "are listed as not run); sampling, scans and encoding still run")
    p.add_argument("--slices", type=int, default=SLICES, help="turns each side takes in a run (its timed steps "
                   "cut into this many slices)")
    p.add_argument("--sample-chars", type=int, default=1000)
    p.add_argument("--recompute-chars", type=int, help="chars per no-cache sample (default: min(sample, 4 blocks))")
    p.add_argument("--scan-shape", help="BxT for the scan timings (default: the preset's batch x block)")
    p.add_argument("--explain-chars", default="2000,20000", help="time charlm.explain (two 1x384 LSTMs) on these "
                   "many val characters, start-up included ('' skips it)")
    p.add_argument("--scan-repeats", type=int, default=7,
                   help="median of N scan timings, charlm and the loop taking turns (0: skip them)")
    p.add_argument("--encode-mb", type=float, default=100, help="corpus size for the encode timing (0: skip)")
    p.add_argument("--large-mb", type=float, default=1000, help="corpus size for scripts/bench_corpus.py: encoding "
                   "MB/s and peak RSS of an encoding run and a cached run, each a fresh process (0: skip)")
    p.add_argument("--out", default=str(ROOT / "bench"))
    a = p.parse_args()
    t_start = time.perf_counter()
    preset = PRESETS[a.preset]
    steps = a.steps or preset["steps"]
    warmup = a.warmup if a.warmup is not None else preset.get("warmup", max(1, steps // 10))
    if not 1 <= warmup < steps:
        p.error(f"--warmup {warmup} must be in [1, --steps)")
    if a.modes != "auto" and not set(a.modes.split(",")) <= set(MODES):
        p.error(f"--modes {a.modes}: auto or a comma-separated subset of {','.join(MODES)}")
    models = all_models() if a.models == "all" else [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in all_models()]
    if unknown:
        p.error(f"--models: no conf/model/{unknown[0]}.yaml")
    block, batch = preset["data"]["block_size"], preset["data"]["batch_size"]
    recompute_chars = a.recompute_chars or min(a.sample_chars, 4 * block)
    res = {"machine": machine_name(), "date": date.today().isoformat(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if CUDA else f"CPU ({os.cpu_count()} cores)",
           "threads": torch.get_num_threads(), "preset": a.preset, "steps": steps, "warmup": warmup,
           "repeats": a.repeats, "slices": a.slices, "sample_chars": a.sample_chars, "recompute_chars": recompute_chars,
           "settings": {**preset["data"], "optim": SHARED, "quiet": QUIET}, "models": {}, "skipped": []}
    out = Path(a.out)
    previous = out / f"results-{res['machine']}.json"
    previous = json.loads(previous.read_text()) if previous.exists() else None
    work = Path(tempfile.mkdtemp(prefix="charlm-bench-"))
    try:
        for name in models:
            entry = None
            for mode in ("random", "stream"):
                overrides, bare = model_setup(name, mode, preset, steps)
                if mode not in modes_for(a.modes, bare["preferred_sampling"]):
                    continue
                if a.budget_s is not None and time.perf_counter() - t_start > a.budget_s:
                    res["skipped"].append(f"{name} {mode}")
                    continue
                print(f"bench: {name} {mode} ...", flush=True)
                spec = {"name": name, "mode": mode, "steps": steps, "warmup": warmup, "block_size": block,
                        "slice": max(1, (steps - warmup) // a.slices),
                        "batch_size": batch, "overrides": overrides, **bare}
                runs = []
                for i in range(a.repeats):  # who starts alternates
                    run_dir = work / f"{name}-{mode}-{i}"
                    runs.append(run_pair(spec | {"overrides": [*overrides, f"hydra.run.dir={run_dir}"],
                                                 "run_dir": str(run_dir)}, spec, work, charlm_first=i % 2 == 0))
                ratios = sorted(paired_ratio(*r) for r in runs)
                c, b = (sorted((r[i] for r in runs), key=lambda x: x["tokens_per_s"])[(len(runs) - 1) // 2]
                        for i in (0, 1))  # each side's median run
                if (c["params"], c["precision"], c["sampling"]) != (b["params"], b["precision"], mode):
                    sys.exit(f"bench: {name} {mode}: the two sides differ: charlm {c['params']} params, "
                             f"{c['precision']}, {c['sampling']}; bare {b['params']} params, {b['precision']}, {mode}")
                entry = entry or {"params": c["params"], "precision": c["precision"], "modes": {},
                                  "sampling": bench_sampling(bare["model"], a.sample_chars, recompute_chars)}
                entry["modes"][mode] = {"charlm": c, "bare": b, "ratio": statistics.median(ratios), "ratios": ratios}
                print(f"bench: {name} {mode}: charlm {c['tokens_per_s']:,.0f} tok/s, bare {b['tokens_per_s']:,.0f} "
                      f"tok/s, ratio {entry['modes'][mode]['ratio']:.2f} (median of {len(ratios)}, "
                      f"{ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)
                res["models"][name] = entry
                write(res, out)
        if a.scan_repeats > 0:
            from charlm.bench.scan import bench_scans

            B, T = (int(v) for v in a.scan_shape.split("x")) if a.scan_shape else (batch, block)
            res |= {"scan_repeats": a.scan_repeats, "scans": bench_scans(B, T, a.scan_repeats)}
            write(res, out)
        if a.explain_chars:
            from charlm.bench.explain import bench_explain

            res["explain"] = bench_explain(work, [int(n) for n in a.explain_chars.split(",")])
            write(res, out)
        if a.encode_mb > 0:
            print(f"bench: encoding a {a.encode_mb:g} MB corpus ...", flush=True)
            corpus, raw, left = work / "corpus.txt", CORPUS.read_bytes(), int(a.encode_mb * 1e6)
            with open(corpus, "wb") as f:
                while left > 0:
                    left -= f.write(raw[:left])
            cold = {"CHARLM_CACHE": str(work / "cache"), "HF_DATASETS_CACHE": str(work / "hf")}
            res["data"] = run_child("encode", {"name": "corpus", "corpus": str(corpus), "mb": a.encode_mb}, work, cold)
            write(res, out)
            cold = {**cold, "CHARLM_CACHE": str(work / "cache-bytes")}  # a cold cache for the byte unit too
            res["data_bytes"] = run_child("encode", {"name": "corpus", "corpus": str(corpus), "mb": a.encode_mb,
                                                     "unit": "byte"}, work, cold)
            write(res, out)
        if a.large_mb > 0:  # a separate small parent, so that no child starts from this process's peak memory
            print(f"bench: a {a.large_mb:g} MB corpus, encoded and cached (scripts/bench_corpus.py) ...", flush=True)
            subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_corpus.py"), "--mb", str(a.large_mb),
                            "--work", str(work / "large"), "--json", str(work / "large.json")], check=True)
            res["large_corpus"] = json.loads((work / "large.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if previous is not None and (change := largest_change(previous, res)):
        res["previous"] = change
    md = write(res, out)
    print("\n" + md + f"\nwritten: {out}/results-{res['machine']}.{{json,md}}")


if __name__ == "__main__":
    main()
