"""scripts/bench.py runs end to end and writes finite positive figures (a check that it works, not a timing)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import ROOT


def test_bench_writes_results(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--preset", "cpu", "--steps", "3",
           "--models", "lstm,transformer", "--sample-chars", "20", "--encode-mb", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [json_path] = tmp_path.glob("results-*.json")
    md = json_path.with_suffix(".md").read_text()
    res = json.loads(json_path.read_text())
    assert res["machine"] in md.splitlines()[0] and res["date"] in md.splitlines()[0]
    assert set(res["models"]) == {"lstm", "transformer"}

    def positive(d: dict, keys: list[str], where: str):
        for k in keys:
            assert isinstance(d.get(k), (int, float)) and math.isfinite(d[k]) and d[k] > 0, f"{where}.{k}={d.get(k)}"

    for name, r in res["models"].items():
        positive(r, ["params", "ratio"], name)
        for side in ("charlm", "bare"):
            positive(r[side], ["params", "tokens_per_s", "seconds", "peak_rss_mb"], f"{name}.{side}")
            assert math.isfinite(r[side]["rss_growth_mb"])
        assert r["charlm"]["params"] == r["bare"]["params"]  # the same architecture on both sides
        positive(r["sampling"], ["single_chars_per_s", "batch64_chars_per_s"], f"{name}.sampling")
        assert f"| {name} |" in md
    positive(res["models"]["transformer"]["sampling"], [
        "single_recompute_chars_per_s", "batch64_recompute_chars_per_s", "single_cache_speedup",
        "batch64_cache_speedup"], "transformer.sampling")
    positive(res["data"], ["mb", "encode_s", "mb_per_s", "prepare_again_s", "peak_rss_mb"], "data")
    assert isinstance(res["data"]["memory_mapped"], bool)
