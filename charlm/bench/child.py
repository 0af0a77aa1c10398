"""The measurements of scripts/bench.py, each run in a fresh process: `python -m charlm.bench.child KIND SPEC.json`
(KIND: charlm, bare or encode) reads the spec and writes what it measured to SPEC.out.

- charlm: `charlm.train.run` on the composed config, with a timing callback;
- bare: the hand-written PyTorch loop of the same architecture and settings, no framework;
- encode: `CharDataModule.prepare()` on a big corpus, cold then again.

Both training sides share the timing window (`Window`, charlm.bench.window) and the optimiser settings
(LR, BETAS, CLIP; the bare loop takes another learning rate from its spec's `lr`: scripts/bare_loop.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from charlm.bench import ROOT
from charlm.bench.window import CUDA, SYNC_PROBE, Window, memory, rss_mb

CORPUS = ROOT / "charlm" / "corpora" / "tinyshakespeare.txt"
LR, BETAS, CLIP = 2e-3, (0.9, 0.999), 1.0  # both sides: AdamW(lr, betas, weight_decay=0), clip norm 1.0, no schedule


class WindowDone(BaseException):
    """Raised by the charlm side's callback once its window is measured: what `charlm.train` does after
    training (the last validation, checkpoints, the final evaluation over the whole val split, the
    final sample: ~1-6 s a run) is not timed, so the bench does not wait for it. A BaseException, so
    that nothing between the callback and `child_charlm` mistakes it for a failure to handle."""


def child_charlm(spec: dict) -> dict:
    """`charlm.train.run` on the composed config (what `python -m charlm.train OVERRIDES` runs), with one
    more Lightning callback: the window opens at on_train_start (data and model built, as in the bare
    loop), counts steps at on_train_batch_end, and ends the run once it is complete (`WindowDone`)."""
    import lightning as L

    from charlm.cli import compose
    from charlm.train import run

    class WindowCallback(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.window = Window(spec)
            self.about = {"params": sum(p.numel() for p in pl_module.model.parameters()),
                          "precision": str(trainer.precision), "sampling": trainer.datamodule.sampling}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.window.step_done()
            if self.window.complete:
                raise WindowDone

    clock = WindowCallback()
    with contextlib.suppress(WindowDone):
        run(compose("train", spec["overrides"]), Path(spec["run_dir"]), spec["name"], extra_callbacks=[clock])
    if not clock.window.complete:
        raise SystemExit(f"charlm side: training ended after {clock.window.done} of {spec['steps']} steps")
    return {**clock.about, **clock.window.result}


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
    """What a user writes by hand (scripts/bare_loop.py runs it alone): ids on the device, random windows or B
    contiguous streams with the state carried and detached, AdamW, clip; no framework."""
    import torch.nn.functional as F
    from torch import nn

    from charlm.models.contract import build_model, capabilities

    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")  # as charlm.training.build does
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
    opt = torch.optim.AdamW(model.parameters(), lr=spec.get("lr", LR), betas=BETAS, weight_decay=0.0)
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

    from charlm.data.datamodule import CharDataModule

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
    """The entry of a child forked from charlm.bench.runs's fork server: its output into `log`, as a
    started child's, then `main`. The working directory is the repository's, as a started child's."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(ROOT)
    main([kind, spec_path])


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in CHILDREN:
        raise SystemExit(f"usage: python -m charlm.bench.child {{{','.join(CHILDREN)}}} SPEC.json")
    spec_path = Path(argv[1])
    result = CHILDREN[argv[0]](json.loads(spec_path.read_text()))
    spec_path.with_suffix(".out").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
