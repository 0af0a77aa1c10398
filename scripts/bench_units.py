"""What `units.*` adds to `charlm.explain`'s wall time: one 1x384 LSTM (conf/model/lstm.yaml, untrained: the
time does not depend on the weights) on the first N val characters of tiny shakespeare, the page alone, then
with `units.find=line` (the unit trace, the ranking, eight strips), then with `units.ablate=[0:3]` as well (the
pass again with a unit held). Each run is one child process, start-up included, as a user waits for it.

    python scripts/bench_units.py [N ...]          (default: 20000)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charlm.bench import ROOT
from charlm.bench.explain import write_lstm_ckpt

RUNS = {"page alone": [], "units.find=line": ["units.find=line"],
        "units.find=line units.ablate=[0:3]": ["units.find=line", "units.ablate=[0:3]"]}


def bench_units(work: Path, n: int) -> dict[str, float]:
    """{run: seconds} for `python -m charlm.explain ckpt_path=A split=val n_chars=N [units...]`."""
    a = write_lstm_ckpt(work / "units-a.ckpt", 1)
    out = {}
    for label, extra in RUNS.items():
        argv = [sys.executable, "-m", "charlm.explain", f"ckpt_path={a}", "split=val", f"n_chars={n}",
                f"out={work / 'explain'}", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        out[label] = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"bench: explain {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        size = (work / "explain" / "explain.html").stat().st_size / 1e6
        print(f"bench: explain, one 1x384 LSTM, {n:,} chars, {label}: {out[label]:.1f} s "
              f"(+{out[label] - out['page alone']:.1f} s), page {size:.1f} MB", flush=True)
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        for n in [int(x) for x in (sys.argv[1:] or ["20000"])]:
            bench_units(Path(d), n)
