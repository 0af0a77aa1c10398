"""charlm.compare for real on tiny settings: two tiny models under a token budget write one run folder
each, the leaderboard and the curves, and the same command again skips both; a time budget stops on
Lightning's max_time with the last weights scored; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import yaml
from conftest import run_cli, tiny_model_overrides
from omegaconf import OmegaConf

from charlm.checkpoint import read_checkpoint
from charlm.cli import compose
from charlm.compare import check, default_dir, group_wandb, pack_args, plan_entry, selection, write_outputs
from charlm.errors import ConfigError

# Tiny models want one thread: on two busy cores, OpenMP's spinning threads make their steps ~100x slower.
ENV = {"OMP_NUM_THREADS": "1"}
COMMON = ["logger=none", "data.batch_size=8", "data.block_size=16", "eval.max_chars=3000", "eval.window_batches=2",
          "sample.n_chars=20", "callbacks.progress_bar=null", "++trainer.enable_progress_bar=false"]


def tiny_recipes(tmp_path, *models: str) -> str:
    """A recipe file with a tiny block per model (the argument that selects it)."""
    path = tmp_path / "tiny.yaml"
    blocks = {"all": ["++trainer.limit_val_batches=4"], **{m: tiny_model_overrides(m) for m in models}}
    path.write_text(yaml.safe_dump(blocks))
    return f"recipes={path}"


def test_token_budget_writes_the_leaderboard_and_a_rerun_skips(tmp_path):
    out = tmp_path / "cmp"
    args = ["models=[rnn,transformer]", "budget.tokens=3072", "budget.evals=3",  # 3072 tokens: 24 steps of 8 x 16
            tiny_recipes(tmp_path, "rnn", "transformer"), *COMMON, f"hydra.run.dir={out}"]
    run_cli("charlm.compare", *args, env=ENV)
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert sorted(r["model"] for r in rows) == ["rnn", "transformer"]
    assert [float(r["best_val_bpc"]) for r in rows] == sorted(float(r["best_val_bpc"]) for r in rows)
    for r in rows:
        assert r["status"] == "ok" and math.isfinite(float(r["best_val_bpc"])) and float(r["steps"]) == 24
        assert int(r["params"]) > 0 and float(r["tokens_per_s"]) > 0 and r["protocol"]
        results = json.loads((out / f"{r['model']}-1337" / "results.json").read_text())
        points = json.loads((out / f"{r['model']}-1337" / "curve.json").read_text())["points"]
        assert [p["step"] for p in points] == [8, 16, 24] and points[-1]["tokens"] == 3072
        assert math.isclose(float(r["best_val_bpc"]), results["best_val_bpc"])
    assert "streams" in next(r for r in rows if r["model"] == "rnn")["protocol"]
    assert "sliding window" in next(r for r in rows if r["model"] == "transformer")["protocol"]
    md = (out / "leaderboard.md").read_text()
    assert "| rnn |" in md and "| transformer |" in md and "3,072 training tokens per run" in md
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    proc = run_cli("charlm.compare", *args, env=ENV)
    assert proc.stdout.count("finished before, skipped") == 2 and "charlm: rnn (" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/results.json")} == mtimes and len(mtimes) == 2


def test_time_budget_stops_on_max_time_and_scores_the_last_weights(tmp_path):
    out = tmp_path / "cmp"
    run_cli("charlm.compare", "models=[rnn]", "budget.seconds=3", "budget.evals=2", tiny_recipes(tmp_path, "rnn"),
            *COMMON, f"hydra.run.dir={out}", env=ENV)
    results = json.loads((out / "rnn-1337" / "results.json").read_text())
    points = json.loads((out / "rnn-1337" / "curve.json").read_text())["points"]
    assert results["steps"] > 0 and points[-1]["step"] == results["steps"]  # validated where max_time stopped it
    assert 2.9 <= points[-1]["seconds"] < 30  # taken when the stop validation started
    assert read_checkpoint(out / "rnn-1337" / "checkpoints" / "last.ckpt")["global_step"] == results["steps"]
    assert "3 s of wall time per run" in (out / "leaderboard.md").read_text()


def test_an_unknown_model_is_one_line_and_writes_nothing(tmp_path):
    proc = run_cli("charlm.compare", "models=[rnn,nope]", "budget.seconds=5", f"hydra.run.dir={tmp_path / 'cmp'}",
                   check=False, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown model 'nope'" in proc.stderr and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("args, fragment", [
    (["budget.seconds=-5"], "budget.seconds=-5: must be >= 1"),
    (["budget.seconds=5", "budget.tokens=1000"], "exactly one budget"),
    (["models=[rnn]"], "exactly one budget"),
    (["budget.tokens=1000", "recipes=nope"], "recipes=nope: no such recipe file"),
    (["budget.tokens=1000", "models=[rnn]", "model.hidden_dim=0"], "rnn: model.hidden_dim=0: must be a positive"),
])
def test_bad_input_is_refused_before_anything_runs(args, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        check(compose("compare", pack_args(args), return_hydra_config=True))


def test_leaderboard_mean_and_sd_over_seeds_failures_last(tmp_path):
    cfg = compose("compare", ["budget.tokens=1000", "seeds=[1,2]"])
    for model, seed, bpc in (("lstm", 1, 2.0), ("lstm", 2, 2.2), ("gru", 1, 1.9), ("gru", 2, 1.9)):
        (tmp_path / f"{model}-{seed}").mkdir()
        (tmp_path / f"{model}-{seed}" / "results.json").write_text(json.dumps(
            {"best_val_bpc": bpc, "best_val_loss": bpc * math.log(2), "best_step": 10, "steps": 20, "params": 5,
             "tokens_per_s": 100.0, "protocol": {"text": "8 streams"}}))
        (tmp_path / f"{model}-{seed}" / "curve.json").write_text(json.dumps(
            {"points": [{"step": 10, "seconds": 1.5, "tokens": 500, "val_bpc": bpc}]}))
    (tmp_path / "rnn-1").mkdir()
    (tmp_path / "rnn-1" / "job.json").write_text(json.dumps({"status": "failed", "error": "diverged at step 3"}))
    write_outputs(tmp_path, cfg, ["lstm", "gru", "rnn"], [1, 2])
    rows = list(csv.DictReader((tmp_path / "leaderboard.csv").open()))
    assert [r["model"] for r in rows] == ["gru", "lstm", "rnn"]
    assert math.isclose(float(rows[1]["best_val_bpc"]), 2.1) and math.isclose(float(rows[1]["best_val_bpc_sd"]),
                                                                               0.1414, rel_tol=1e-3)
    assert float(rows[1]["seconds_to_best"]) == 1.5 and float(rows[1]["tokens_to_best"]) == 500
    assert rows[2]["status"] == "failed" and rows[2]["seeds"] == "0/2"
    md = (tmp_path / "leaderboard.md").read_text()
    assert "2.1000 ± 0.1414" in md and "rnn: failed: diverged at step 3" in md


def test_token_budget_sets_max_steps_and_wandb_runs_share_a_group(tmp_path):
    cfg = compose("compare", pack_args(["budget.tokens=100000", "budget.evals=4", "logger=wandb"]))
    overrides, train_cfg = plan_entry(cfg, {"lstm": ["data.batch_size=10"]}, "lstm", 7)
    assert "trainer.max_steps=157" in overrides and "trainer.val_check_interval=39" in overrides  # 100000 / (10*64)
    assert train_cfg.seed == 7 and train_cfg.data.batch_size == 10
    group_wandb(train_cfg, tmp_path / "lstm-7")
    assert train_cfg.logger.wandb.group == f"compare-{tmp_path.name}" and train_cfg.logger.wandb.name == "lstm-7"



@pytest.mark.parametrize("key, value", [("models", {"a": 1}), ("seeds", "abc"), ("recipes", [1, 2]),
                                        ("overrides", {"a": 1}), ("budget.seconds", "abc"), ("budget.evals", "abc")])
def test_every_compare_key_rejects_a_wrong_type(key, value):
    cfg = compose("compare", ["budget.tokens=1000"])
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError, match=re.escape(key)):
        selection(cfg)


def test_the_default_folder_is_the_same_for_the_same_command():
    def folder(*args):
        cfg = compose("compare", pack_args(list(args)), return_hydra_config=True)
        return default_dir(cfg, [])[-1]

    assert folder("budget.seconds=45", "recipes=cpu") == "hydra.run.dir='outputs/compare/cpu-45s'"
    assert folder("budget.tokens=9", "recipes=cpu", "models=[rnn]") == "hydra.run.dir='outputs/compare/cpu-9tok'"
    tuned = folder("budget.seconds=45", "recipes=cpu", "model.dropout=0.1")
    assert tuned.startswith("hydra.run.dir='outputs/compare/cpu-45s-") and tuned == folder(
        "recipes=cpu", "model.dropout=0.1", "budget.seconds=45")
    cfg = compose("compare", ["budget.seconds=45", "hydra.run.dir=/x"], return_hydra_config=True)
    assert default_dir(cfg, ["a"]) == ["a"]  # a folder the command names is kept
