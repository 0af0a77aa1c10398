"""The measurements of scripts/bench.py, each run in a fresh process: `python scripts/bench_child.py KIND SPEC.json`
(KIND: charlm, bare or encode) reads the spec and writes what it measured to SPEC.out.

- charlm: `charlm.train.run` on the composed config, with a timing callback;
- bare: the hand-written PyTorch loop of the same architecture and settings, no framework;
- encode: `CharDataModule.prepare()` on a big corpus, cold then again.

Both training sides share the timing window (`Window`) and the optimiser settings (LR, BETAS, CLIP).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "charlm" / "corpora" / "tinyshakespeare.txt"
CUDA = torch.cuda.is_available()
LR, BETAS, CLIP = 2e-3, (0.9, 0.999), 1.0  # both sides: AdamW(lr, betas, weight_decay=0), clip norm 1.0, no schedule
SLICES = 24  # turns each side takes in a run: its timed steps cut into this many slices
SYNC_PROBE = 10  # CUDA only: steps after the timed window run under torch's sync debug mode, counting host syncs


def status_mb(key: str) -> float:
    """A size from Linux's /proc/self/status (VmRSS, VmHWM) in MB, else nan."""
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident set size (Linux), else nan."""
    return status_mb("VmRSS")


def memory(rss0: float, cuda: bool = CUDA) -> dict:
    """Peak RSS of this process so far, its growth since `rss0`, and the CUDA peak when there is one.

    The peak is Linux's VmHWM, the high-water mark of this program's own memory: `ru_maxrss` of a child
    started by fork and exec begins at its parent's RSS at the fork (the bench's parent, holding every
    model it sampled, then passes its ~530 MB to every child it starts). Elsewhere `ru_maxrss`."""
    peak = status_mb("VmHWM")
    if peak != peak:  # nan: no /proc
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return {"peak_rss_mb": peak, "rss_growth_mb": peak - rss0,
            **({"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {})}


def sync() -> None:
    if CUDA and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Turns:
    """Two measuring processes taking turns on the machine through two named pipes (made by the parent):
    a process runs only while it holds the turn, and hands it over by writing one byte to the other's
    pipe, then waits for a byte on its own. The side that does not start waits before its first step;
    each side hands over after each timed slice; after its last, the side that started waits for the
    other's last slice, the other goes on. Both first meet once, so that neither's start-up (imports,
    building) runs during the other's slices."""

    def __init__(self, spec: dict):
        self.mine = os.open(spec["my_pipe"], os.O_RDWR)  # read-write: opening never blocks on the other end
        self.theirs = os.open(spec["their_pipe"], os.O_RDWR)
        self.first = spec["first"]
        self.hand_over(wait=True)  # both ready (start-up done) before either starts its steps
        if not self.first:
            self.wait()

    def wait(self) -> None:
        os.read(self.mine, 1)

    def hand_over(self, wait: bool) -> None:
        os.write(self.theirs, b".")
        if wait:
            self.wait()


class Window:
    """Times steps warmup+1..steps in slices of `slice` steps (synced at both ends of each); on CUDA
    then counts host syncs over SYNC_PROBE steps.

    With `turns` in the spec, charlm and the bare loop run at once in two processes and take turns
    slice by slice (`Turns`): each slice of one side sits next to a slice of the other in time, so
    both meet the same machine (a 2-core VM drifts by 30% over tens of seconds), and the time spent
    waiting for the turn is not counted. tokens_per_s is the whole window's rate over its own slices;
    `slices` keeps each one's rate, for the parent's paired ratios."""

    def __init__(self, spec: dict):
        self.warmup, self.steps, self.done, self.result, self.rss0 = spec["warmup"], spec["steps"], 0, {}, rss_mb()
        self.step_tokens = spec["batch_size"] * spec["block_size"]
        self.slice = spec.get("slice") or max(1, (self.steps - self.warmup) // SLICES)
        self.rates: list[float] = []
        self.spans: list[tuple[float, float]] = []  # each slice's (start, end) clock
        self.seconds = 0.0
        self.turns = Turns(spec["turns"]) if spec.get("turns") else None
        self.t0 = None

    def step_done(self) -> None:
        self.done += 1
        timed = self.done - self.warmup
        if timed == 0:
            sync()
            self.t0 = time.perf_counter()
        elif timed > 0 and (timed % self.slice == 0 or self.done == self.steps) and self.done <= self.steps:
            sync()
            end = time.perf_counter()  # CLOCK_MONOTONIC on Linux: comparable across processes
            seconds = end - self.t0
            self.spans.append((self.t0, end))
            self.seconds += seconds
            steps = timed - self.slice * len(self.rates)  # this slice's (the last one may be short)
            self.rates.append(self.step_tokens * steps / seconds)
            last = self.done == self.steps
            if self.turns is not None:  # the first side also waits after its last slice: the other's is to come
                self.turns.hand_over(wait=not last or self.turns.first)
            self.t0 = time.perf_counter()
            if last:
                self._finish()
        elif CUDA and self.done == self.steps + SYNC_PROBE:
            torch.cuda.set_sync_debug_mode(0)
            self._catch.__exit__(None, None, None)
            syncs = [w for w in self._seen if "synchroniz" in str(w.message)]
            self.result["host_syncs_per_step"] = len(syncs) / SYNC_PROBE
            self.result["host_sync_sites"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})

    def _finish(self) -> None:
        self.result = {"tokens_per_s": self.step_tokens * (self.steps - self.warmup) / self.seconds,
                       "seconds": self.seconds, "slices": self.rates, "spans": self.spans,
                       **memory(self.rss0)}
        if CUDA:
            self._catch = warnings.catch_warnings(record=True)
            self._seen = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")


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

    unit = spec.get("unit", "char")  # byte: raw bytes (data.unit=byte, the enwik8 protocol)
    rss0, t0 = rss_mb(), time.perf_counter()
    CharDataModule(path=spec["corpus"], unit=unit).prepare()
    cold, mem = time.perf_counter() - t0, memory(rss0, cuda=False)
    t0 = time.perf_counter()
    (dm := CharDataModule(path=spec["corpus"], unit=unit)).prepare()
    warm, ids_file = time.perf_counter() - t0, mapped_file(dm.splits["train"].data_ptr())
    return {"mb": spec["mb"], "unit": unit, "encode_s": cold, "mb_per_s": spec["mb"] / cold,
            "prepare_again_s": warm, **mem,
            "memory_mapped": ids_file is not None, "ids_file": ids_file and Path(ids_file).name,
            "ids_dtype": str(dm.splits["train"].dtype)}


CHILDREN = {"charlm": child_charlm, "bare": child_bare, "encode": child_encode}


def forked(kind: str, spec_path: str, log: str) -> None:
    """The entry of a child forked from scripts/bench_runs.py's fork server: its output into `log`, as a
    started child's, then `main`. The working directory is the repository's, as a started child's."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(ROOT)
    main([kind, spec_path])


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in CHILDREN:
        raise SystemExit(f"usage: bench_child.py {{{','.join(CHILDREN)}}} SPEC.json")
    spec_path = Path(argv[1])
    result = CHILDREN[argv[0]](json.loads(spec_path.read_text()))
    spec_path.with_suffix(".out").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
