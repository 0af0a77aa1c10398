"""`python scripts/bench.py [--preset cpu|gpu] [--models lstm,mingru] [--modes auto|random,stream] [--out DIR]`

One run on this machine, per model family and training mode: charlm's training tokens/s and peak memory
next to a bare PyTorch loop with the same architecture and settings (read the ratio, not the absolute
figures; the target is >= 0.95), sampling speed (KV cache vs full recomputation for the transformer),
the parallel scans of the modern recurrent models against a Python loop over time, and the time to
encode a large corpus. Each training side runs in a fresh process. Writes OUT/results-MACHINE.{json,md}
(rewritten after each model, so an interrupted run keeps what it measured); docs/bench.md explains them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "charlm" / "corpora" / "tinyshakespeare.txt"
CUDA = torch.cuda.is_available()
PRESETS = {  # the sizes of ../shared/BENCHMARKS.md's CPU and GPU tables
    # conf/model/*.yaml as they are: what `make train` / `make compare` run on a CPU
    "cpu": {"data": {"block_size": 64, "batch_size": 32}, "steps": 200, "recipes": None, "sizes": {}},
    # the model sizes (and compile) of conf/compare/gpu.yaml: 3x512 RNNs with emb 128 and dropout 0.2,
    # transformer 6L/6H/384 compiled, modern models 6x384
    "gpu": {"data": {"block_size": 256, "batch_size": 64}, "steps": 200, "recipes": "gpu", "sizes": {}},
    # tests and the gpu_check dry run: every code path in seconds; its figures mean nothing
    "tiny": {"data": {"block_size": 16, "batch_size": 8}, "steps": 6, "recipes": None,
             "sizes": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1, "n_embd": 32, "n_layer": 1, "n_head": 2}},
}
LR, BETAS, CLIP = 2e-3, (0.9, 0.999), 1.0  # both sides: AdamW(lr, betas, weight_decay=0), clip norm 1.0, no schedule
SHARED = ["~scheduler", f"optim.lr={LR}", f"optim.betas=[{BETAS[0]},{BETAS[1]}]", "optim.weight_decay=0.0",
          "clip.algorithm=norm", f"clip.value={CLIP}"]
QUIET = ["logger=none", "eval.max_chars=2048", "eval.window_batches=0", "sample.n_chars=0"]  # validation negligible
MODES = ("random", "stream")
FIRST = ["rnn", "lstm", "gru", "transformer", "mingru", "minlstm", "hawk", "mamba"]  # then the others, by name
SYNC_PROBE = 10  # CUDA only: steps after the timed window run under torch's sync debug mode, counting host syncs


# ---- measurements, in the child processes ---------------------------------------------------

def rss_mb() -> float:
    """Current resident set size (Linux), else nan."""
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory(rss0: float, cuda: bool = CUDA) -> dict:
    """Peak RSS of this process so far, its growth since `rss0`, and the CUDA peak when there is one."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return {"peak_rss_mb": peak, "rss_growth_mb": peak - rss0,
            **({"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {})}


def sync() -> None:
    if CUDA and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Window:
    """Times steps warmup+1..steps (synced at both ends); on CUDA then counts host syncs over SYNC_PROBE steps."""

    def __init__(self, spec: dict):
        self.warmup, self.steps, self.done, self.result, self.rss0 = spec["warmup"], spec["steps"], 0, {}, rss_mb()
        self.tokens = (spec["steps"] - spec["warmup"]) * spec["batch_size"] * spec["block_size"]

    def step_done(self) -> None:
        self.done += 1
        if self.done == self.warmup:
            sync()
            self.t0 = time.perf_counter()
        elif self.done == self.steps:
            sync()
            seconds = time.perf_counter() - self.t0
            self.result = {"tokens_per_s": self.tokens / seconds, "seconds": seconds, **memory(self.rss0)}
            if CUDA:
                self._catch = warnings.catch_warnings(record=True)
                self._seen = self._catch.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
        elif CUDA and self.done == self.steps + SYNC_PROBE:
            torch.cuda.set_sync_debug_mode(0)
            self._catch.__exit__(None, None, None)
            syncs = [w for w in self._seen if "synchroniz" in str(w.message)]
            self.result["host_syncs_per_step"] = len(syncs) / SYNC_PROBE
            self.result["host_sync_sites"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})


def child_charlm(spec: dict) -> dict:
    """`charlm.train.run` on the composed config (what `python -m charlm.train OVERRIDES` runs), with one
    more Lightning callback: the window opens at on_train_start (data and model built, as in the bare
    loop) and counts steps at on_train_batch_end."""
    import lightning as L

    from charlm.cli import compose
    from charlm.train import run

    class WindowCallback(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.window = Window(spec)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.window.step_done()

    clock = WindowCallback()
    results = run(compose("train", spec["overrides"]), Path(spec["run_dir"]), spec["name"], extra_callbacks=[clock])
    return {"params": results["params"], "precision": results["precision"], "sampling": results["sampling"],
            **clock.window.result}


def detach(state):
    """The carried state cut from the graph (truncated BPTT): tensors, or tuples/lists/dicts of them."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (list, tuple)):
        return type(state)(detach(s) for s in state)
    if isinstance(state, dict):
        return {k: detach(v) for k, v in state.items()}
    return state


def child_bare(spec: dict) -> dict:
    """What a user writes by hand (../shared/bench/bare_rnn.py): ids on the device, random windows or B
    contiguous streams with the state carried and detached, AdamW, clip; no framework."""
    import torch.nn.functional as F
    from torch import nn

    from charlm.models.contract import build_model, capabilities

    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")  # as charlm.build does
    torch.backends.cudnn.benchmark = True  # as trainer=gpu does
    dev = "cuda" if CUDA else "cpu"
    text = CORPUS.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    train = data[: int(0.9 * len(data))].to(dev)
    cfg, B, T = spec["model"], spec["batch_size"], spec["block_size"]

    class Bare(nn.Module):  # embedding -> nn.LSTM/GRU/RNN -> dropout -> linear
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(len(chars), cfg["embed_dim"])
            R = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg["cell"]]
            kw = {"nonlinearity": cfg.get("nonlinearity", "tanh")} if cfg["cell"] == "rnn" else {}
            layers, p = cfg["num_layers"], cfg["dropout"]
            self.rnn = R(cfg["embed_dim"], cfg["hidden_dim"], layers, batch_first=True,
                         dropout=p if layers > 1 else 0.0, **kw)
            self.drop, self.head = nn.Dropout(p), nn.Linear(cfg["hidden_dim"], len(chars))

        def forward(self, x, state=None):
            h, state = self.rnn(self.emb(x), state)  # (B, T, H)
            return self.head(self.drop(h)), state  # (B, T, V)

    # RNNLM families (untied) get the hand-written module; others (GPT, Python cells, birnn, the scan
    # models) charlm's own nn.Module, so the difference is the framework around the model, not the model
    hand_written = cfg["_target_"] == "charlm.models.rnn.RNNLM" and not cfg.get("tie_weights")
    model = (Bare() if hand_written else build_model(cfg, len(chars))).to(dev)
    aux_losses = capabilities(model).aux_losses
    step_model = torch.compile(model) if spec["compile"] else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    amp = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(spec["precision"]) if CUDA else None
    if CUDA and amp is None and spec["precision"] not in ("32-true", "32"):
        raise SystemExit(f"bare loop: precision {spec['precision']} not supported")
    ctx = torch.autocast(dev, dtype=amp) if amp is not None else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(dev) if amp == torch.float16 else None
    offsets = torch.arange(T + 1, device=dev)
    if spec["mode"] == "stream":  # the corpus cut into B streams; chunk k of each row follows chunk k-1
        stream_len = (len(train) - 1) // B
        rows = torch.arange(B, device=dev)[:, None] * stream_len
        chunks = (stream_len - 1) // T
    window, state = Window(spec), None
    for k in range(spec["steps"] + (SYNC_PROBE if CUDA else 0)):
        if spec["mode"] == "stream":
            pos = (k % chunks) * T
            w = train[rows + pos + offsets]  # (B, T+1)
            state = None if pos == 0 else state
        else:
            w = train[torch.randint(len(train) - T - 1, (B,), device=dev)[:, None] + offsets]  # (B, T+1)
        x, y = w[:, :-1], w[:, 1:]
        with ctx:
            logits, new_state = step_model(x, state)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            if aux_losses is not None:
                loss = loss + sum(aux_losses(x, y).values())
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            scaler.step(opt)
            scaler.update()
        if spec["mode"] == "stream":
            state = detach(new_state)
        window.step_done()
    return {"params": sum(p.numel() for p in model.parameters()), "precision": spec["precision"], **window.result}


def mapped_file(ptr: int) -> str | None:
    """The file whose memory map holds address `ptr` (from Linux's /proc/self/maps), or None."""
    with contextlib.suppress(OSError):
        for line in open("/proc/self/maps"):
            parts = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= ptr < hi and len(parts) == 6 and parts[5].startswith("/"):
                return parts[5].strip()
    return None


def child_encode(spec: dict) -> dict:
    """CharDataModule(path=...).prepare() on a big corpus: cold, then again (a cache hit, where data.py caches)."""
    import datasets  # noqa: F401  (imported before the clock starts)

    from charlm.data import CharDataModule

    rss0, t0 = rss_mb(), time.perf_counter()
    CharDataModule(path=spec["corpus"]).prepare()
    cold, mem = time.perf_counter() - t0, memory(rss0, cuda=False)
    t0 = time.perf_counter()
    (dm := CharDataModule(path=spec["corpus"])).prepare()
    warm, ids_file = time.perf_counter() - t0, mapped_file(dm.splits["train"].data_ptr())
    return {"mb": spec["mb"], "encode_s": cold, "mb_per_s": spec["mb"] / cold, "prepare_again_s": warm, **mem,
            "memory_mapped": ids_file is not None, "ids_file": ids_file and Path(ids_file).name,
            "ids_dtype": str(dm.splits["train"].dtype)}


def run_child(kind: str, spec: dict, work: Path, env: dict | None = None) -> dict:
    tag = f"{kind}-{spec['name']}-{spec.get('mode', '')}"
    spec_path, log = work / f"{tag}.json", work / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    e = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, __file__, "--child", kind, str(spec_path)], cwd=ROOT, env=e,
                            stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"bench: {tag} failed ({rc}):\n" + log.read_text()[-3000:])
    return json.loads(spec_path.with_suffix(".out").read_text())


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
    from charlm.generate import generate
    from charlm.models.contract import build_model, capabilities
    from charlm.vocab import CharVocab

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


def bench_scans(B: int, T: int, repeats: int) -> list[dict]:
    """scripts/bench_scan.py's scans and modern blocks (conf/model sizes): parallel vs a Python loop over time."""
    from bench_scan import blocks, scans, timed

    dev = "cuda" if CUDA else "cpu"
    rows = []
    for name, shape, parallel, loop, inputs in scans(B, T, dev) + blocks(B, T, dev):
        p, q = timed(parallel, inputs, repeats), timed(loop, inputs, repeats)
        rows.append({"what": name, "shape": shape, "parallel_ms": p, "loop_ms": q, "speedup": q / p})
        print(f"bench: {name} {shape}: parallel {p:.1f} ms, loop {q:.1f} ms ({q / p:.1f}x)", flush=True)
    return rows


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

    from charlm.build import model_class_capabilities, plain, resolve_precision
    from charlm.cli import compose

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


def fmt(v, digits: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def lowest_ratio(res: dict) -> tuple[float, str] | None:
    pairs = [(m["ratio"], f"{name} {mode}") for name, r in res["models"].items() for mode, m in r["modes"].items()]
    return min(pairs) if pairs else None


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
             f"{res['steps']} training steps per side, the last {res['steps'] - res['warmup']} timed (best of "
             f"{res['repeats']}); batch {res['settings']['batch_size']} x {res['settings']['block_size']} chars; "
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
        lines += ["", f"Parallel scan vs a Python loop over time (forward + backward, median of {res['scan_repeats']};"
                  " blocks at conf/model sizes):", "", "| what | shape | parallel ms | loop ms | speed-up |",
                  "|---" * 5 + "|"]
        lines += [f"| {s['what']} | {s['shape']} | {s['parallel_ms']:.2f} | {s['loop_ms']:.2f} | {s['speedup']:.1f}x |"
                  for s in res["scans"]]
    if d := res.get("data"):
        lines += ["", f"Data: a {d['mb']:g} MB corpus through CharDataModule.prepare() in {d['encode_s']:.2f} s "
                  f"({d['mb_per_s']:.1f} MB/s, peak RSS +{d['rss_growth_mb']:.0f} MB); prepared again in "
                  f"{d['prepare_again_s']:.2f} s; ids memory-mapped: {'yes' if d['memory_mapped'] else 'no'}."]
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
    p.add_argument("--warmup", type=int, help="untimed first steps (default: steps // 10, at least 1)")
    p.add_argument("--repeats", type=int, default=1, help="alternate charlm and bare runs N times, keep each's best")
    p.add_argument("--budget-s", type=float, help="start no new training run after this many seconds (the rest "
                   "are listed as not run); sampling, scans and encoding still run")
    p.add_argument("--sample-chars", type=int, default=1000)
    p.add_argument("--recompute-chars", type=int, help="chars per no-cache sample (default: min(sample, 4 blocks))")
    p.add_argument("--scan-shape", help="BxT for the scan timings (default: the preset's batch x block)")
    p.add_argument("--scan-repeats", type=int, default=3, help="median of N scan timings (0: skip them)")
    p.add_argument("--encode-mb", type=float, default=100, help="corpus size for the encode timing (0: skip)")
    p.add_argument("--out", default=str(ROOT / "bench"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, spec_path = a.child[0], Path(a.child[1])
        child = {"charlm": child_charlm, "bare": child_bare, "encode": child_encode}[kind]
        spec_path.with_suffix(".out").write_text(json.dumps(child(json.loads(spec_path.read_text()))))
        return

    t_start = time.perf_counter()
    preset = PRESETS[a.preset]
    steps = a.steps or preset["steps"]
    warmup = a.warmup if a.warmup is not None else max(1, steps // 10)
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
           "repeats": a.repeats, "sample_chars": a.sample_chars, "recompute_chars": recompute_chars,
           "settings": {**preset["data"], "optim": SHARED, "quiet": QUIET}, "models": {}, "skipped": []}
    out = Path(a.out)
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
                        "batch_size": batch, "overrides": overrides, **bare}
                runs = []
                for i in range(a.repeats):
                    run_dir = work / f"{name}-{mode}-{i}"
                    c = run_child("charlm", spec | {"overrides": [*overrides, f"hydra.run.dir={run_dir}"],
                                                    "run_dir": str(run_dir)}, work)
                    runs.append((c, run_child("bare", spec, work)))
                c, b = (max((r[i] for r in runs), key=lambda x: x["tokens_per_s"]) for i in (0, 1))
                if (c["params"], c["precision"], c["sampling"]) != (b["params"], b["precision"], mode):
                    sys.exit(f"bench: {name} {mode}: the two sides differ: charlm {c['params']} params, "
                             f"{c['precision']}, {c['sampling']}; bare {b['params']} params, {b['precision']}, {mode}")
                entry = entry or {"params": c["params"], "precision": c["precision"], "modes": {},
                                  "sampling": bench_sampling(bare["model"], a.sample_chars, recompute_chars)}
                entry["modes"][mode] = {"charlm": c, "bare": b, "ratio": c["tokens_per_s"] / b["tokens_per_s"]}
                print(f"bench: {name} {mode}: charlm {c['tokens_per_s']:,.0f} tok/s, bare {b['tokens_per_s']:,.0f} "
                      f"tok/s, ratio {entry['modes'][mode]['ratio']:.2f}", flush=True)
                res["models"][name] = entry
                write(res, out)
        if a.scan_repeats > 0:
            B, T = (int(v) for v in a.scan_shape.split("x")) if a.scan_shape else (batch, block)
            res |= {"scan_repeats": a.scan_repeats, "scans": bench_scans(B, T, a.scan_repeats)}
            write(res, out)
        if a.encode_mb > 0:
            print(f"bench: encoding a {a.encode_mb:g} MB corpus ...", flush=True)
            corpus, raw, left = work / "corpus.txt", CORPUS.read_bytes(), int(a.encode_mb * 1e6)
            with open(corpus, "wb") as f:
                while left > 0:
                    left -= f.write(raw[:left])
            cold = {"CHARLM_CACHE": str(work / "cache"), "HF_DATASETS_CACHE": str(work / "hf")}
            res["data"] = run_child("encode", {"name": "corpus", "corpus": str(corpus), "mb": a.encode_mb}, work, cold)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = write(res, out)
    print("\n" + md + f"\nwritten: {out}/results-{res['machine']}.{{json,md}}")


if __name__ == "__main__":
    main()
