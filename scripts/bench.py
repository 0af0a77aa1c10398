"""`python scripts/bench.py [--preset cpu|gpu] [--models lstm,transformer] [--steps N] [--out DIR]`

One run on this machine, per model family: charlm's training tokens/s and peak memory next to a bare
PyTorch loop with the same architecture and settings (read the ratio, not the absolute figures), sampling
speed (KV cache vs full recomputation for the transformer), and the time to encode a large corpus. Each
training side runs in a fresh process. Writes OUT/results-MACHINE.{json,md}; docs/bench.md explains them.
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
CORPUS = ROOT / "charlm" / "corpora" / "tinyshakespeare.txt"
CUDA = torch.cuda.is_available()
PRESETS = {  # the sizes of ../shared/BENCHMARKS.md's CPU and GPU tables
    "cpu": {"data": {"block_size": 64, "batch_size": 32}, "steps": 200,
            "rnn": {"embed_dim": 64, "hidden_dim": 256, "num_layers": 1, "dropout": 0.0},
            "transformer": {"n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0}},
    "gpu": {"data": {"block_size": 256, "batch_size": 64}, "steps": 500,
            "rnn": {"embed_dim": 128, "hidden_dim": 512, "num_layers": 3, "dropout": 0.2},
            "transformer": {"n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2, "compile": True}},
}
SHARED = ["scheduler=constant", "optim.lr=2e-3", "optim.betas=[0.9,0.999]", "optim.weight_decay=0.0",
          "clip.algorithm=norm", "clip.value=1.0"]  # what the bare loop does: AdamW 2e-3, clip 1.0, no schedule
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
    """The real `python -m charlm.train`, its clock swapped for one timing the same window as the bare loop."""
    import charlm.train as T

    window = None

    class WindowClock(T.TrainClock):
        def __init__(self):
            super().__init__()

            class _Cb(type(self.callback)):
                def on_train_start(self, trainer, pl_module):
                    nonlocal window
                    super().on_train_start(trainer, pl_module)
                    window = Window(spec)  # after data and model are built, as in the bare loop

                def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                    window.step_done()

            self.callback = _Cb()

    T.TrainClock = WindowClock
    sys.argv = ["charlm.train", *spec["overrides"], f"hydra.run.dir={spec['run_dir']}"]
    T.main()
    results = json.loads((Path(spec["run_dir"]) / "results.json").read_text())
    return {"params": results["params"], "precision": results["precision"], **window.result}


def child_bare(spec: dict) -> dict:
    """What a user writes by hand (../shared/bench/bare_rnn.py): ids on the device, random windows, AdamW, clip."""
    import torch.nn.functional as F
    from hydra.utils import instantiate
    from torch import nn

    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")  # as charlm.train does
    torch.backends.cudnn.benchmark = True  # as trainer=gpu does
    dev = "cuda" if CUDA else "cpu"
    text = CORPUS.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    train = data[: int(0.9 * len(data))].to(dev)
    cfg, B, T = dict(spec["model"]), spec["batch_size"], spec["block_size"]
    compiled = cfg.pop("compile", False)

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

        def forward(self, x):
            h, _ = self.rnn(self.emb(x))  # (B, T, H)
            return self.head(self.drop(h)), None  # (B, T, V)

    # RNNLM families get the hand-written module; others (GPT, Python cells, birnn) charlm's own nn.Module
    hand_written = cfg["_target_"] == "charlm.models.rnn.RNNLM"
    model = (Bare() if hand_written else instantiate(cfg, vocab_size=len(chars), _convert_="all")).to(dev)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    bf16 = CUDA and spec["precision"] == "bf16-mixed"
    ctx = torch.autocast(dev, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    aux_losses = getattr(model, "aux_losses", None)
    offsets = torch.arange(T + 1, device=dev)
    window = Window(spec)
    for _ in range(spec["steps"] + (SYNC_PROBE if CUDA else 0)):
        w = train[torch.randint(len(train) - T - 1, (B,), device=dev)[:, None] + offsets]  # (B, T+1)
        x, y = w[:, :-1], w[:, 1:]
        with ctx:
            logits, _ = step_model(x)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            if aux_losses is not None:
                loss = loss + sum(aux_losses(x, y).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.step_done()
    return {"params": sum(p.numel() for p in model.parameters()), **window.result}


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
    spec_path, log = work / f"{kind}-{spec['name']}.json", work / f"{kind}-{spec['name']}.log"
    spec_path.write_text(json.dumps(spec))
    e = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, __file__, "--child", kind, str(spec_path)], cwd=ROOT, env=e,
                            stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"bench: {kind} {spec['name']} failed ({rc}):\n" + log.read_text()[-3000:])
    return json.loads(spec_path.with_suffix(".out").read_text())


# ---- sampling, in this process --------------------------------------------------------------

@torch.no_grad()
def recompute(model, n_chars: int, num_samples: int, block_size: int, g) -> None:
    """Sampling without the KV cache: re-feed the whole context (cropped to block_size) for every char."""
    from charlm.sample import pick_next

    idx = torch.zeros(num_samples, 1, dtype=torch.long, device=next(model.parameters()).device)  # (N, 1)
    for _ in range(n_chars):
        logits, _ = model(idx[:, -block_size:])  # (N, <=block_size, V)
        idx = torch.cat([idx, pick_next(logits[:, -1], 1.0, generator=g).to(idx.device)[:, None]], 1)


def bench_sampling(cfg: dict, n_chars: int, recompute_chars: int) -> dict:
    from hydra.utils import instantiate

    from charlm.sample import generate
    from charlm.vocab import CharVocab

    vocab = CharVocab.from_text(CORPUS.read_text())
    cfg = {k: v for k, v in cfg.items() if k != "compile"}
    model = instantiate(cfg, vocab_size=len(vocab), _convert_="all").to("cuda" if CUDA else "cpu").eval()
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
        if "block_size" in cfg:  # the transformer: the same without its KV cache
            r = rate(lambda n, c: recompute(model, c, n, cfg["block_size"], g), n, recompute_chars)
            out |= {f"{key}_recompute_chars_per_s": r, f"{key}_cache_speedup": out[f"{key}_chars_per_s"] / r,
                    "recompute_chars": recompute_chars}
    return out


# ---- the parent ------------------------------------------------------------------------------

def model_setup(name: str, preset: dict, steps: int) -> tuple[list[str], dict, str]:
    """charlm's overrides, the composed model config (plain data) and the precision, for one family."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    sizes = preset["transformer"] if name == "transformer" else preset["rnn"]
    common = [f"model={name}", f"trainer={'gpu' if CUDA else 'cpu'}", *SHARED,
              *(f"data.{k}={v}" for k, v in preset["data"].items()),
              *(f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sizes.items())]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model_cfg = OmegaConf.to_container(compose("train", overrides=common).model, resolve=True)
    precision = getattr(get_class(model_cfg["_target_"]), "gpu_precision", "32-true") if CUDA else "32-true"
    total = steps + (SYNC_PROBE if CUDA else 0)  # one validation (one batch) at the end, after the window
    return common + ["logger=none", f"trainer.max_steps={total}", f"trainer.val_check_interval={total}",
                     "+trainer.limit_val_batches=1", "sample.n_chars=0"], model_cfg, precision


def machine_name() -> str:
    if CUDA:
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"cpu-{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}core"


def fmt(v, digits: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def table(res: dict) -> str:
    def mem(side):
        return fmt(side.get("cuda_peak_mb")) if CUDA else f"{fmt(side['peak_rss_mb'])} (+{fmt(side['rss_growth_mb'])})"

    def nocache(s, key):
        if "recompute_chars" not in s:
            return "-"
        return f"{fmt(s[key + '_recompute_chars_per_s'])} ({s[key + '_cache_speedup']:.1f}x)"

    m = "CUDA peak MB" if CUDA else "peak RSS MB (growth)"
    lines = [f"## charlm bench: {res['machine']}, {res['date']}", "",
             f"{res['device']}, torch {res['torch']}, preset {res['preset']}: {res['steps']} training steps per side, "
             f"the last {res['steps'] - res['warmup']} timed (best of {res['repeats']}); samples of "
             f"{res['sample_chars']} chars (no-cache: {res['recompute_chars']}).", "",
             f"| model | params | charlm tok/s | bare tok/s | charlm/bare | charlm {m} | bare {m} | sample 1x chars/s "
             "| sample 64x chars/s | no-cache 1x chars/s (cache speedup) | no-cache 64x chars/s (cache speedup) |",
             "|---" * 11 + "|"]
    for name, r in res["models"].items():
        c, b, s = r["charlm"], r["bare"], r["sampling"]
        lines.append(f"| {name} | {fmt(r['params'])} | {fmt(c['tokens_per_s'])} | {fmt(b['tokens_per_s'])} "
                     f"| {r['ratio']:.2f} | {mem(c)} | {mem(b)} | {fmt(s['single_chars_per_s'])} "
                     f"| {fmt(s['batch64_chars_per_s'])} | {nocache(s, 'single')} | {nocache(s, 'batch64')} |")
    syncs = [f"{n} {r['charlm']['host_syncs_per_step']:.1f}" for n, r in res["models"].items()
             if "host_syncs_per_step" in r["charlm"]]
    if syncs:
        lines += ["", "charlm host syncs per training step (after the window): " + ", ".join(syncs)]
    if d := res.get("data"):
        lines += ["", f"Data: a {d['mb']:g} MB corpus through CharDataModule.prepare() in {d['encode_s']:.2f} s "
                  f"({d['mb_per_s']:.1f} MB/s, peak RSS +{d['rss_growth_mb']:.0f} MB); prepared again in "
                  f"{d['prepare_again_s']:.2f} s; ids memory-mapped: {'yes' if d['memory_mapped'] else 'no'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if CUDA else "cpu")
    p.add_argument("--models", default="rnn,lstm,gru,transformer", help="comma-separated conf/model names")
    p.add_argument("--all", action="store_true", help="add gru_tanh_out and birnn")
    p.add_argument("--steps", type=int, help="training steps per side (default: the preset's)")
    p.add_argument("--warmup", type=int, help="untimed first steps (default: steps // 10, at least 1)")
    p.add_argument("--repeats", type=int, default=1, help="alternate charlm and bare runs N times, keep each's best")
    p.add_argument("--sample-chars", type=int, default=1000)
    p.add_argument("--recompute-chars", type=int, help="chars per no-cache sample (default: min(sample, 4 blocks))")
    p.add_argument("--encode-mb", type=float, default=100, help="corpus size for the encode timing (0: skip)")
    p.add_argument("--out", default=str(ROOT / "bench"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, spec_path = a.child[0], Path(a.child[1])
        child = {"charlm": child_charlm, "bare": child_bare, "encode": child_encode}[kind]
        spec_path.with_suffix(".out").write_text(json.dumps(child(json.loads(spec_path.read_text()))))
        return

    preset = PRESETS[a.preset]
    steps = a.steps or preset["steps"]
    warmup = a.warmup if a.warmup is not None else max(1, steps // 10)
    if not 1 <= warmup < steps:
        p.error(f"--warmup {warmup} must be in [1, --steps)")
    models = [m for m in a.models.split(",") if m] + (["gru_tanh_out", "birnn"] if a.all else [])
    block, batch = preset["data"]["block_size"], preset["data"]["batch_size"]
    recompute_chars = a.recompute_chars or min(a.sample_chars, 4 * block)
    res = {"machine": machine_name(), "date": date.today().isoformat(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if CUDA else f"CPU ({os.cpu_count()} cores)",
           "preset": a.preset, "steps": steps, "warmup": warmup, "repeats": a.repeats, "sample_chars": a.sample_chars,
           "recompute_chars": recompute_chars, "settings": {**preset["data"], "optim": SHARED}, "models": {}}
    work = Path(tempfile.mkdtemp(prefix="charlm-bench-"))
    try:
        for name in models:
            print(f"bench: {name} ...", flush=True)
            overrides, model_cfg, precision = model_setup(name, preset, steps)
            spec = {"name": name, "steps": steps, "warmup": warmup, "block_size": block, "batch_size": batch,
                    "overrides": overrides, "model": model_cfg, "precision": precision, "run_dir": str(work / name)}
            runs = [(run_child("charlm", spec | {"run_dir": f"{work / name}-{i}"}, work), run_child("bare", spec, work))
                    for i in range(a.repeats)]
            c, b = (max((r[i] for r in runs), key=lambda x: x["tokens_per_s"]) for i in (0, 1))
            res["models"][name] = {"params": c["params"], "precision": precision, "charlm": c, "bare": b,
                                   "ratio": c["tokens_per_s"] / b["tokens_per_s"],
                                   "sampling": bench_sampling(model_cfg, a.sample_chars, recompute_chars)}
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
    out, md = Path(a.out), table(res)
    out.mkdir(parents=True, exist_ok=True)
    for ext, text in (("json", json.dumps(res, indent=2) + "\n"), ("md", md)):
        tmp = out / f"results-{res['machine']}.{ext}.tmp"
        tmp.write_text(text)
        os.replace(tmp, tmp.with_suffix(""))
    print("\n" + md + f"\nwritten: {out}/results-{res['machine']}.{{json,md}}")


if __name__ == "__main__":
    main()
