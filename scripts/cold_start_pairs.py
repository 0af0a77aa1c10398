"""`python scripts/cold_start_pairs.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]`

Runs trained alike except for one option (`state_reset=0` in A, `state_reset=0.05` in B, the same seed),
compared pair by pair: each run's best checkpoint through `charlm.evaluate` on its val split (written to
RUN/evaluate.json, read back on the next call), then B - A on

- the yardstick, paired over its 8 streams (the streams are the same characters in both runs);
- the cold-start loss (the first 32 characters from an empty state), paired over its 64 seeded offsets;
- the nanoGPT-style window figure (random 256-character windows from an empty state, seed 1337).

Each pair's ± is the standard error of its paired differences, within that pair. With several pairs (seeds),
the last lines test the mean difference over the pairs by Student's t on n - 1 degrees of freedom: that is
the test across training runs, the one a default should follow.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from charlm.cli import compose
from charlm.evaluate import evaluate
from charlm.scoring.cold_start import paired_difference
from charlm.scoring.significance import t_p_value

KEYS = ("loss", "stream_losses", "cold_start_loss", "cold_start_losses", "window_loss")


def figures(run: Path) -> dict:
    """The best checkpoint's figures, measured once."""
    cached = run / "evaluate.json"
    if cached.exists():
        return json.loads(cached.read_text())
    out = evaluate(compose("evaluate", [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}"]))
    cached.write_text(json.dumps({k: out[k] for k in KEYS}))
    return json.loads(cached.read_text())


def across(name: str, diffs: list[float]) -> str:
    """'name: mean ± SE over n pairs, t = ..., p = ... (df n-1)'."""
    n = len(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:
        return f"{name}: {mean:+.4f} in all {n} pairs"
    t = mean / (sd / math.sqrt(n))
    return (f"{name}: {mean:+.4f} ± {sd / math.sqrt(n):.4f} over {n} pairs, t = {t:.2f}, "
            f"p = {t_p_value(t, n - 1):.3f} (Student's t, df {n - 1})")


def main(runs: list[str]) -> None:
    if len(runs) < 2 or len(runs) % 2:
        sys.exit(__doc__.splitlines()[0])
    yard, cold, window = [], [], []
    for a, b in zip(runs[::2], runs[1::2]):
        fa, fb = figures(Path(a)), figures(Path(b))
        ys, yse = paired_difference(fb["stream_losses"], fa["stream_losses"])
        cs, cse = paired_difference(fb["cold_start_losses"], fa["cold_start_losses"])
        yard.append(fb["loss"] - fa["loss"])
        cold.append(fb["cold_start_loss"] - fa["cold_start_loss"])
        window.append(fb["window_loss"] - fa["window_loss"])
        print(f"{Path(a).name} -> {Path(b).name}: yardstick {fa['loss']:.4f} -> {fb['loss']:.4f} ({ys:+.4f} ± "
              f"{yse:.4f} over 8 streams); cold start {fa['cold_start_loss']:.4f} -> {fb['cold_start_loss']:.4f} "
              f"({cs:+.4f} ± {cse:.4f} over 64 offsets); window {fa['window_loss']:.4f} -> {fb['window_loss']:.4f}")
    if len(yard) > 1:
        for name, diffs in (("yardstick", yard), ("cold start", cold), ("window", window)):
            print(across(name, diffs))


if __name__ == "__main__":
    main(sys.argv[1:])
