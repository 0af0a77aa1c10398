"""`charlm.explain`'s wall time, start-up included, for two 1x384 LSTMs (conf/model/lstm.yaml) on the first N
val characters of tiny shakespeare: what a user waits for the page. The weights are untrained (the time does
not depend on them); each size runs once, in a child process, as `python -m charlm.explain` would."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from charlm.bench import ROOT


def write_lstm_ckpt(path: Path, seed: int) -> Path:
    """A charlm checkpoint of an untrained default LSTM (the contract's keys: state_dict, model config, vocab)."""
    from omegaconf import OmegaConf

    from charlm.checkpoint import save_model
    from charlm.data.corpus import encode_corpus
    from charlm.models.contract import build_model

    vocab, _ = encode_corpus(None)
    model_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "lstm.yaml"), resolve=True)
    torch.manual_seed(seed)
    return save_model(path, build_model(model_cfg, len(vocab)), model_cfg, vocab, "lstm")


def bench_explain(work: Path, sizes: list[int]) -> list[dict]:
    """[{chars, seconds}] for `python -m charlm.explain ckpt_path=A against=B split=val n_chars=N`."""
    a, b = write_lstm_ckpt(work / "explain-a.ckpt", 1), write_lstm_ckpt(work / "explain-b.ckpt", 2)
    out = []
    for n in sizes:
        argv = [sys.executable, "-m", "charlm.explain", f"ckpt_path={a}", f"against={b}", "split=val",
                f"n_chars={n}", f"out={work / 'explain'}"]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"bench: explain n_chars={n} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        out.append({"chars": n, "seconds": seconds})
        print(f"bench: explain, two 1x384 LSTMs, {n:,} chars: {seconds:.1f} s", flush=True)
    return out


def main(argv: list[str]) -> None:
    """`python scripts/bench_explain.py [N ...]` (default: 2000 20000), in a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        bench_explain(Path(d), [int(x) for x in (argv or ["2000", "20000"])])
