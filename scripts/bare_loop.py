"""`python scripts/bare_loop.py --cell lstm --layers 1 --hidden 384 --emb 64 --batch 32 --seq 64 --dropout 0.1
--lr 5e-3 --seconds 30 [--out FILE.json]`

The bare PyTorch training loop of `make bench` (`child_bare` in charlm/bench/child.py: embedding,
nn.LSTM/GRU/RNN, linear head, AdamW, clip norm 1.0, random windows of tiny shakespeare; no framework) run for
about `--seconds` on this machine: its tokens/s is the machine's calibration, the figure that puts two
machines' records side by side. A short probe times a few steps, then a run of as many steps as fill the
seconds is timed (its first tenth untimed). Prints one JSON line; with --out also writes it there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

PROBE_STEPS = 10  # steps of the probe run that sizes the timed one


def run(args: argparse.Namespace) -> dict:
    from charlm.bench.child import child_bare

    model = {"_target_": "charlm.models.rnn.RNNLM", "cell": args.cell, "embed_dim": args.emb,
             "hidden_dim": args.hidden, "num_layers": args.layers, "dropout": args.dropout, "tie_weights": False}
    spec = {"name": "calibration", "mode": "random", "model": model, "batch_size": args.batch,
            "block_size": args.seq, "compile": False, "precision": "32-true", "lr": args.lr}
    t0 = time.perf_counter()
    probe = child_bare(spec | {"steps": PROBE_STEPS + 1, "warmup": 1})
    steps_per_s = probe["tokens_per_s"] / (args.batch * args.seq)
    steps = max(PROBE_STEPS + 1, math.ceil(args.seconds * steps_per_s))
    timed = child_bare(spec | {"steps": steps, "warmup": max(1, steps // 10)})
    return {"what": "bare PyTorch loop (scripts/bench.py), random windows of tiny shakespeare",
            "cell": args.cell, "layers": args.layers, "hidden": args.hidden, "emb": args.emb,
            "batch": args.batch, "seq": args.seq, "dropout": args.dropout, "lr": args.lr,
            "params": timed["params"], "steps": steps, "timed_seconds": timed["seconds"],
            "tokens_per_s": timed["tokens_per_s"], "peak_rss_mb": timed["peak_rss_mb"],
            "wall_seconds": time.perf_counter() - t0, "torch_threads": _threads(), "cpu_count": os.cpu_count()}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", choices=["lstm", "gru", "rnn"], default="lstm")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--emb", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seconds", type=float, default=30.0, help="about how long the timed run lasts")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args()
    for key in ("layers", "hidden", "emb", "batch", "seq"):
        if getattr(a, key) < 1:
            p.error(f"--{key} {getattr(a, key)}: must be >= 1")
    if not 0 < a.seconds <= 3600 or not 0 <= a.dropout < 1 or not a.lr > 0:
        p.error("--seconds must be in (0, 3600], --dropout in [0, 1), --lr > 0")
    res = run(a)
    line = json.dumps(res)
    print(line)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
