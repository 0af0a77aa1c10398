"""scripts/bench.py (charlm.bench) runs end to end and writes finite positive figures (a check that it works, not a
timing), its GPU preset reads the GPU recipes' sizes, and scripts/gpu_check.sh's CPU dry run passes (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from charlm.bench import child, plan, runs, tables

# Tiny models want one thread: on two busy cores, OpenMP's spinning threads make their steps ~100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def positive(d: dict, keys: list[str], where: str) -> None:
    for k in keys:
        assert isinstance(d.get(k), (int, float)) and math.isfinite(d[k]) and d[k] > 0, f"{where}.{k}={d.get(k)}"


@pytest.mark.slow  # a benchmark's smoke run: minutes of two modes and a scan table; make test-all runs it
def test_bench_writes_results_for_both_modes(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--preset", "tiny", "--steps", "3",
           "--models", "rnn,transformer", "--modes", "random,stream", "--sample-chars", "20", "--encode-mb", "1",
           "--large-mb", "1",
           "--scan-shape", "2x8", "--scan-repeats", "1", "--explain-chars", "60", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [json_path] = tmp_path.glob("results-*.json")
    md = json_path.with_suffix(".md").read_text()
    res = json.loads(json_path.read_text())
    assert res["machine"] in md.splitlines()[0] and res["date"] in md.splitlines()[0]
    assert set(res["models"]) == {"rnn", "transformer"} and not res["skipped"]

    for name, r in res["models"].items():
        positive(r, ["params"], name)
        assert set(r["modes"]) == {"random", "stream"}, name
        for mode, m in r["modes"].items():
            positive(m, ["ratio"], f"{name}.{mode}")
            for side in ("charlm", "bare"):
                positive(m[side], ["params", "tokens_per_s", "seconds", "peak_rss_mb"], f"{name}.{mode}.{side}")
                assert math.isfinite(m[side]["rss_growth_mb"])
            assert m["charlm"]["params"] == m["bare"]["params"] == r["params"]  # the same architecture on both sides
            assert m["charlm"]["sampling"] == mode  # charlm trained the way the bare loop did
        positive(r["sampling"], ["single_chars_per_s", "batch64_chars_per_s"], f"{name}.sampling")
        assert f"| {name} |" in md
    positive(res["models"]["transformer"]["sampling"], [
        "single_recompute_chars_per_s", "batch64_recompute_chars_per_s", "single_cache_speedup",
        "batch64_cache_speedup"], "transformer.sampling")
    scans = {s["what"].split()[0] for s in res["scans"]}
    assert scans >= {"positive_gated_scan", "log_scan", "linear_scan", "selective_scan", "mingru", "mamba"}
    for s in res["scans"]:
        positive(s, ["parallel_ms", "loop_ms", "speedup"], s["what"])
    positive(res["data"], ["mb", "encode_s", "mb_per_s", "prepare_again_s", "peak_rss_mb"], "data")
    assert isinstance(res["data"]["memory_mapped"], bool)
    for run in ("encode", "cached", "train"):
        positive(res["large_corpus"][run], ["peak_rss_mb", "wall_s"], f"large_corpus.{run}")
    assert "scripts/bench_corpus.py): encoded in" in md
    assert "Lowest ratio" in md and "charlm's scans (compiled C loops on a CPU" in md
    assert [e["chars"] for e in res["explain"]] == [60] and res["explain"][0]["seconds"] > 0
    assert "charlm.explain, two 1x384 LSTMs" in md


def test_default_modes_and_models():
    assert plan.modes_for("auto", "stream") == ["random", "stream"]
    assert plan.modes_for("auto", "random") == ["random"]  # the transformer and birnn train on windows
    assert plan.modes_for("stream", "random") == ["stream"]
    names = plan.all_models()
    assert names[:4] == ["rnn", "lstm", "gru", "transformer"]
    assert {"mingru", "minlstm", "hawk", "mamba", "birnn", "gru_tanh_out"} <= set(names)


def test_gpu_preset_takes_the_gpu_recipes_sizes():
    gpu = plan.PRESETS["gpu"]
    lstm = plan.size_overrides("lstm", gpu)
    assert "model.hidden_dim=512" in lstm and "model.num_layers=3" in lstm
    assert not any(o.startswith(("optim.", "data.", "scheduler.")) for o in lstm)  # both sides keep the same optim
    assert "compile=true" in plan.size_overrides("transformer", gpu)
    assert plan.size_overrides("lstm", plan.PRESETS["cpu"]) == []  # conf/model sizes as they are
    overrides, bare = plan.model_setup("mamba", "stream", gpu, steps=5)
    assert "data.sampling=stream" in overrides and "~scheduler" in overrides and "optim.weight_decay=0.0" in overrides
    assert bare["model"]["hidden_dim"] == 384 and bare["preferred_sampling"] == "stream"


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**ENV, "GPU_CHECK_DIR": str(tmp_path / "check"), "GPU_CHECK_EXPORT": str(tmp_path / "export")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    check = tmp_path / "check"
    for part in ("part1", "part2"):
        summary = (check / f"summary-{part}.md").read_text()
        assert "failed" not in summary and "timed out" not in summary, summary
        assert (tmp_path / "export" / f"gpu-check-{part}.tar.gz").exists()
    assert list((check / "bench").glob("results-*.json"))
    ttq = json.loads((check / "shakespeare_best" / "time_to_quality.json").read_text())
    assert ttq["points"] and set(ttq["thresholds"]) == {"3.3", "1.45", "1.4"}
    assert ttq["window_val_loss"] is not None and ttq["best_val_loss"] is not None
    assert (check / "shakespeare_best" / "csv" / "metrics.csv").exists()
    assert (check / "compare" / "leaderboard.md").exists()


def test_largest_change_against_a_previous_run():
    def res(ratios):
        return {"date": "d", "models": {"rnn": {"modes": {m: {"ratio": r} for m, r in ratios.items()}}}}

    change = tables.largest_change(res({"random": 0.90, "stream": 1.00}), res({"random": 0.95, "stream": 0.80}))
    assert change["what"] == "rnn stream" and abs(change["change"] - (-0.20)) < 1e-12
    assert tables.largest_change({"models": {"rnn": {"ratio": 0.9}}}, res({"random": 0.9})) is None  # older format
    assert f"optim.lr={child.LR}" in plan.SHARED and child.LR == 2e-3  # charlm's side trains at the bare loop's LR


def test_a_slow_spell_cancels_out_of_the_paired_ratio():
    # charlm at 0.9 of the bare loop throughout; the machine halves its speed for slices 3-5 of both
    speed = [1, 1, 1, 0.5, 0.5, 0.5, 1, 1]
    charlm = {"tokens_per_s": 0.0, "slices": [900 * s for s in speed]}
    bare = {"tokens_per_s": 0.0, "slices": [1000 * s for s in speed]}
    assert runs.paired_ratio(charlm, bare) == pytest.approx(0.9)
    # one slice hit by a burst on one side only is trimmed away
    charlm["slices"][1] = 300
    assert runs.paired_ratio(charlm, bare) == pytest.approx(0.9)
    # no slices (an old result): the whole windows' ratio
    assert runs.paired_ratio({"tokens_per_s": 450.0}, {"tokens_per_s": 500.0}) == pytest.approx(0.9)


def test_a_steady_drift_cancels_out_of_the_paired_ratio():
    """Slices in turns (charlm, bare, charlm, ...) on a machine whose speed falls 3% a slice: a slice
    compared with the next one only would read 0.9 x 1.03 (or / 1.03); compared with both neighbours
    (geometric mean), 0.9 exactly. A burst on one slice of one side is trimmed away."""
    n, drop = 24, 0.97
    speed = [drop**k for k in range(2 * n)]                       # the machine, slice by slice in time
    spans = [(float(k), k + 0.9) for k in range(2 * n)]
    charlm = {"tokens_per_s": 0.0, "slices": [900 * speed[2 * i] for i in range(n)], "spans": spans[0::2]}
    bare = {"tokens_per_s": 0.0, "slices": [1000 * speed[2 * i + 1] for i in range(n)], "spans": spans[1::2]}
    naive = sorted(c / b for c, b in zip(charlm["slices"], bare["slices"]))[n // 2]
    assert naive == pytest.approx(0.9 / drop)                     # what pairing in order alone reads
    assert runs.paired_ratio(charlm, bare) == pytest.approx(0.9, rel=1e-9)
    charlm["slices"][5] *= 0.3
    bare["slices"][11] *= 2.5
    assert runs.paired_ratio(charlm, bare) == pytest.approx(0.9, rel=1e-9)
    # the bare loop first: the same
    swapped_c = {**charlm, "spans": spans[1::2], "slices": [900 * speed[2 * i + 1] for i in range(n)]}
    swapped_b = {**bare, "spans": spans[0::2], "slices": [1000 * speed[2 * i] for i in range(n)]}
    assert runs.paired_ratio(swapped_c, swapped_b) == pytest.approx(0.9, rel=1e-9)


TINY_BARE = {"name": "rnn", "mode": "random", "steps": 8, "warmup": 2, "slice": 2, "block_size": 8, "batch_size": 2,
             "overrides": [], "compile": False, "precision": "32-true",
             "model": {"_target_": "charlm.models.rnn.RNNLM", "cell": "rnn", "embed_dim": 8, "hidden_dim": 8,
                       "num_layers": 1, "dropout": 0.0}}


def test_the_bare_loop_takes_its_learning_rate_from_the_spec(monkeypatch):
    """scripts/bare_loop.py's --lr reaches the bare loop's AdamW through the spec; a bench spec has none: LR."""
    import torch

    seen, real = [], torch.optim.AdamW

    def adamw(params, lr, **kw):
        seen.append(lr)
        return real(params, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    short = TINY_BARE | {"steps": 3, "warmup": 1, "slice": 1}
    child.child_bare(short | {"lr": 0.05})
    child.child_bare(short)
    assert seen == [0.05, 2e-3]


def bare_on_both_sides(monkeypatch) -> list[str]:
    """Make run_pair start the bare loop as both sides (one OpenMP thread, named by the side it stands
    for); returns the list of sides started, in order."""
    starts, real_start = [], runs.start_child

    def start_child(kind, spec, work, env=None):
        starts.append(kind)
        return real_start("bare", spec | {"name": kind}, work, {**(env or {}), "OMP_NUM_THREADS": "1"})

    monkeypatch.setattr(runs, "start_child", start_child)
    return starts


def test_the_two_sides_take_turns(tmp_path, monkeypatch):
    """Two bare-loop children in turns: each one's slices are separated in time by the other's, and
    neither's window overlaps the other's slices."""
    starts = bare_on_both_sides(monkeypatch)
    a, b = runs.run_pair(TINY_BARE, TINY_BARE, tmp_path, charlm_first=True)
    assert starts == ["charlm", "bare"]
    assert len(a["slices"]) == len(b["slices"]) == 3
    assert all(r > 0 for r in a["slices"] + b["slices"])
    # in time: a's slice 1, b's slice 1, a's slice 2, ... and no two overlap
    spans = sorted([(*span, "a") for span in a["spans"]] + [(*span, "b") for span in b["spans"]])
    assert [side for *_, side in spans] == ["a", "b"] * 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))


def test_a_failing_side_stops_its_partner(tmp_path, monkeypatch):
    """One side dies before its first step: the other, waiting for its turn, is stopped, and the bench
    exits naming the failed side instead of waiting forever."""
    good = TINY_BARE | {"steps": 4, "warmup": 1, "slice": 1}
    broken = good | {"model": {**good["model"], "_target_": "charlm.models.rnn.NoSuchModel"}}
    bare_on_both_sides(monkeypatch)
    with pytest.raises(SystemExit, match="bare-bare-random failed"):
        runs.run_pair(good, broken, tmp_path, charlm_first=True)


def test_a_forked_side_measures_and_fails_as_a_started_one(tmp_path, monkeypatch):
    """A side forked from the fork server (the charlm side on a CPU; here the bare loop, made a forked
    kind) writes its figures where a started child does, and a failure reaches the bench with the end of
    the child's log (its stderr went there)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server, started here, passes it to every child
    monkeypatch.setattr(runs, "FORKED", ("bare",))
    proc, spec_path, tag = runs.start_child("bare", TINY_BARE, tmp_path)
    assert isinstance(proc, runs.Forked)
    out = runs.finish_child(proc, spec_path, tag)
    assert len(out["slices"]) == 3 and all(r > 0 for r in out["slices"])
    broken = TINY_BARE | {"name": "broken",
                          "model": {**TINY_BARE["model"], "_target_": "charlm.models.rnn.NoSuchModel"}}
    proc, spec_path, tag = runs.start_child("bare", broken, tmp_path)
    assert isinstance(proc, runs.Forked)
    with pytest.raises(SystemExit, match=r"(?s)bare-broken-random failed \(1\).*NoSuchModel"):
        runs.finish_child(proc, spec_path, tag)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux's /proc")
def test_a_started_childs_peak_memory_is_its_own(tmp_path):
    """A child started while its parent holds 400 MB reports its own peak, not the parent's: ru_maxrss
    would begin at the parent's RSS at the fork."""
    held = bytearray(400 * 2**20)
    held[:: 4096] = b"\x01" * len(held[:: 4096])  # touched: resident
    parent_rss = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS:"))) / 1024
    code = ("import json; from charlm.bench import window; "
            "print(json.dumps(window.memory(window.rss_mb(), cuda=False)))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                    check=True).stdout)
    assert parent_rss > 400
    assert 0 < out["peak_rss_mb"] < parent_rss - 300, (out, parent_rss)  # the child imports torch: ~230 MB
    assert out["rss_growth_mb"] >= 0
    del held


def test_the_charlm_side_ends_with_its_window(tmp_path):
    """The charlm side returns its figures once its last timed step is counted: what `charlm.train` does
    after training (last validation, checkpoints, the final evaluation, results.json) is not waited for."""

    overrides, bare = plan.model_setup("rnn", "stream", plan.PRESETS["tiny"], 6)
    run_dir = tmp_path / "run"
    spec = {"name": "rnn", "mode": "stream", "steps": 6, "warmup": 1, "slice": 2, "block_size": 16, "batch_size": 8,
            "overrides": [*overrides, f"hydra.run.dir={run_dir}"], "run_dir": str(run_dir), **bare}
    out = child.child_charlm(spec)
    assert out["sampling"] == "stream" and out["precision"] == "32-true"
    # tiny sizes on tiny shakespeare's 65 chars: embedding, nn.RNN (W_ih, W_hh, two biases), head
    assert out["params"] == 65 * 16 + (32 * 16 + 32 * 32 + 2 * 32) + (32 * 65 + 65)
    assert len(out["slices"]) == 3 and all(r > 0 for r in out["slices"])
    assert not (run_dir / "results.json").exists() and not list(run_dir.rglob("*.ckpt"))
