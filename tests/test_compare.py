"""charlm.compare for real on tiny settings: two tiny models, three seeds, a token budget: one run folder per
(model, seed), the paired columns and the mark in the leaderboard, the curves; the same command again skips
every run. The paired statistics on hand-made results; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import statistics

import pytest
import yaml
from conftest import run_cli, tiny_model_overrides
from omegaconf import OmegaConf

from charlm.checkpoint import read_checkpoint
from charlm.cli import compose
from charlm.compare import check, default_dir, group_wandb, pack_args, plan_entry, selection
from charlm.errors import ConfigError
from charlm.scoring.leaderboard import paired_difference, write_outputs

# Tiny models want one thread: on two busy cores, OpenMP's spinning threads make their steps ~100x slower.
ENV = {"OMP_NUM_THREADS": "1"}
COMMON = ["logger=none", "data.batch_size=8", "data.block_size=16", "eval.max_chars=2000", "eval.window_batches=1",
          "sample.n_chars=20", "callbacks.progress_bar=null", "++trainer.enable_progress_bar=false"]
HAS_CONTEXT = importlib.util.find_spec("charlm.studies") is not None and \
    importlib.util.find_spec("charlm.studies.context") is not None


def tiny_recipes(tmp_path, blocks: dict[str, list[str]]) -> str:
    """A recipe file with a tiny block per model (plus `blocks`' extra overrides), and the argument that selects it."""
    path = tmp_path / "tiny.yaml"
    recipes = {"all": ["++trainer.limit_val_batches=2"], **{m: tiny_model_overrides(m) + extra
                                                             for m, extra in blocks.items()}}
    path.write_text(yaml.safe_dump(recipes))
    return f"recipes={path}"


def test_three_paired_seeds_write_the_paired_columns_and_a_rerun_skips(tmp_path):
    out = tmp_path / "cmp"
    # the transformer at lr 1e-7 cannot learn in 12 steps: the rnn leads on every seed, its 95% interval far from 0
    args = ["models=[rnn,transformer]", "seeds=[1,2,3]", "budget.tokens=1536", "budget.evals=2", "context=false",
            tiny_recipes(tmp_path, {"rnn": [], "transformer": ["optim.lr=1e-7"]}), *COMMON, f"hydra.run.dir={out}"]
    run_cli("charlm.compare", *args, env=ENV)  # 1536 tokens: 12 steps of 8 x 16
    rows = {r["model"]: r for r in csv.DictReader((out / "leaderboard.csv").open())}
    assert list(rows) == ["rnn", "transformer"]
    bpc = {(m, s): json.loads((out / f"{m}-{s}" / "results.json").read_text())["best_val_bpc"]
           for m in rows for s in (1, 2, 3)}
    diffs = [bpc["transformer", s] - bpc["rnn", s] for s in (1, 2, 3)]
    assert math.isclose(float(rows["transformer"]["vs_leader"]), sum(diffs) / 3, rel_tol=1e-9)
    assert math.isclose(float(rows["transformer"]["vs_leader_se"]), statistics.stdev(diffs) / 3 ** 0.5, rel_tol=1e-9)
    assert rows["transformer"]["vs_leader_mark"] == "*" and rows["transformer"]["sign_agrees"] == "yes"
    assert rows["transformer"]["paired_seeds"] == "3" and rows["rnn"]["sign_agrees"] == "leader"
    for m, r in rows.items():
        assert r["status"] == "ok" and r["seeds"] == "3/3" and float(r["steps"]) == 12
        points = json.loads((out / f"{m}-2" / "curve.json").read_text())["points"]
        assert [p["step"] for p in points] == [6, 12] and points[-1]["tokens"] == 1536
        assert json.loads((out / f"{m}-2" / "results.json").read_text())["budget"]["tokens"] == 1536
    md = (out / "leaderboard.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| transformer |"))
    assert re.search(r"\| \+\d\.\d{4} ± \d\.\d{4} \(\+\d\.\d{4} to \+\d\.\d{4}\) \* \| yes \|", line), line
    assert "| rnn |" in md and "| leader |" in md and "standard error" in md and "1,536 training tokens" in md
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    proc = run_cli("charlm.compare", *args, env=ENV)
    assert proc.stdout.count("finished before, skipped") == 6 and "charlm: rnn (" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/results.json")} == mtimes and len(mtimes) == 6


@pytest.mark.skipif(not HAS_CONTEXT, reason="charlm.studies.context (the context curve) is not in this tree yet")
def test_the_best_checkpoint_gets_its_effective_context(tmp_path):
    out = tmp_path / "cmp"
    run_cli("charlm.compare", "models=[rnn]", "seeds=[1]", "budget.tokens=1024", "budget.evals=1",
            "context_positions=40", tiny_recipes(tmp_path, {"rnn": []}), *COMMON, f"hydra.run.dir={out}", env=ENV)
    context = json.loads((out / "rnn-1" / "context.json").read_text())
    assert context["positions"] == 40 and context["seconds"] > 0 and context["effective_context"] is not None
    row = next(csv.DictReader((out / "leaderboard.csv").open()))
    assert math.isclose(float(row["effective_context"]), context["effective_context"])
    assert row["sign_agrees"] == "leader" and "context curve" in (out / "leaderboard.md").read_text()


@pytest.mark.slow
def test_a_seconds_budget_is_trains_own_and_scores_the_last_weights(tmp_path):
    out = tmp_path / "cmp"
    run_cli("charlm.compare", "models=[rnn]", "seeds=[1]", "budget.seconds=10", "budget.evals=2", "context=false",
            tiny_recipes(tmp_path, {"rnn": []}), *COMMON, f"hydra.run.dir={out}", env=ENV)
    results = json.loads((out / "rnn-1" / "results.json").read_text())
    points = json.loads((out / "rnn-1" / "curve.json").read_text())["points"]
    assert results["budget"]["seconds"] == 10 and points[-1]["step"] == results["steps"] > 0
    assert 9 <= points[-1]["seconds"] < 60
    assert read_checkpoint(out / "rnn-1" / "checkpoints" / "last.ckpt")["global_step"] == results["steps"]
    assert "10 s of wall time per run" in (out / "leaderboard.md").read_text()


def test_an_unknown_model_is_one_line_and_writes_nothing(tmp_path):
    proc = run_cli("charlm.compare", "models=[rnn,nope]", "budget.seconds=15", f"hydra.run.dir={tmp_path / 'cmp'}",
                   check=False, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown model 'nope'" in proc.stderr and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("args, fragment", [
    (["budget.seconds=5"], "budget.seconds=5: must be >= 10"),
    (["budget.tokens=0"], "budget.tokens=0: must be >= 1"),
    (["budget.tokens=100", "models=[lstm]"], "lstm: budget.tokens=100: less than one step"),  # 32 x 64 a step
    (["budget.seconds=15", "budget.tokens=1000"], "exactly one budget"),
    (["models=[rnn]"], "exactly one budget"),
    (["budget.tokens=5000", "budget.evals=0"], "budget.evals=0: must be >= 1"),
    (["budget.tokens=5000", "context_positions=0"], "context_positions=0: must be >= 1"),
    (["budget.tokens=5000", "recipes=nope"], "recipes=nope: no such recipe file"),
    (["budget.tokens=5000", "models=[rnn]", "model.hidden_dim=0"], "rnn: model.hidden_dim=0: must be a positive"),
])
def test_bad_input_is_refused_before_anything_runs(args, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        check(compose("compare", pack_args(args), return_hydra_config=True))


def write_run(folder, bpc: float, seconds: float = 1.5) -> None:
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(
        {"best_val_bpc": bpc, "best_val_loss": bpc * math.log(2), "best_step": 10, "steps": 20, "params": 5,
         "tokens_per_s": 100.0, "protocol": {"text": "8 streams"}, "startup_seconds": 2.0, "final_eval_seconds": 3.0}))
    (folder / "curve.json").write_text(json.dumps(
        {"points": [{"step": 10, "seconds": seconds, "tokens": 500, "val_bpc": bpc + 0.1},
                    {"step": 20, "seconds": seconds * 2, "tokens": 1000, "val_bpc": bpc}]}))


def test_paired_statistics_on_hand_made_results(tmp_path):
    cfg = compose("compare", ["budget.tokens=1000", "seeds=[1,2,3]"])
    table = {"lead": (1.50, 1.52, 1.49), "a": (1.60, 1.65, 1.58), "b": (1.51, 1.50, 1.53), "c": (1.70, 1.75, None)}
    for model, values in table.items():
        for seed, bpc in zip((1, 2, 3), values):
            if bpc is not None:
                write_run(tmp_path / f"{model}-{seed}", bpc, seconds=seed)
    (tmp_path / "c-3").mkdir()
    (tmp_path / "c-3" / "job.json").write_text(json.dumps({"status": "failed", "error": "diverged at step 3"}))
    (tmp_path / "a-1" / "context.json").write_text(json.dumps({"effective_context": 40.0, "seconds": 2.0}))
    (tmp_path / "a-2" / "context.json").write_text(json.dumps({"effective_context": 60.0, "seconds": 4.0}))
    write_outputs(tmp_path, cfg, ["a", "b", "c", "lead"], [1, 2, 3])
    rows = {r["model"]: r for r in csv.DictReader((tmp_path / "leaderboard.csv").open())}
    assert list(rows) == ["lead", "b", "a", "c"]  # by mean bpc: 1.5033, 1.5133, 1.61, 1.725
    # by hand: a - lead = 0.10, 0.13, 0.09: mean 0.10667, sd 0.020817, SE 0.020817 / sqrt(3) = 0.012019;
    # t = 8.875 on 2 df: p = 1 - t / sqrt(2 + t^2) = 0.012459; 95% interval 0.10667 -+ 4.3027 SE = 0.0550 to 0.1584
    a = rows["a"]
    assert math.isclose(float(a["vs_leader"]), 0.106667, rel_tol=1e-4)
    assert math.isclose(float(a["vs_leader_se"]), 0.012019, rel_tol=1e-4)
    assert math.isclose(float(a["vs_leader_p"]), 0.012459, rel_tol=1e-3)
    assert (round(float(a["vs_leader_low"]), 4), round(float(a["vs_leader_high"]), 4)) == (0.0550, 0.1584)
    assert (a["vs_leader_mark"], a["sign_agrees"], a["paired_seeds"]) == ("*", "yes", "3")
    # b - lead = 0.01, -0.02, 0.04: mean 0.01, sd 0.03, SE 0.017321, t = 0.577: signs differ, p = 0.62
    b = rows["b"]
    assert math.isclose(float(b["vs_leader"]), 0.01, rel_tol=1e-6) and math.isclose(float(b["vs_leader_se"]),
                                                                                    0.017321, rel_tol=1e-4)
    assert (b["vs_leader_mark"], b["sign_agrees"]) == ("", "no")
    # c failed seed 3: paired over seeds 1 and 2 only: 0.20, 0.23: mean 0.215, sd 0.021213, SE 0.015; t = 14.33
    # on 1 df: p = 1 - (2/pi) atan(14.33) = 0.04434, below 5% alone (its interval, +-12.706 SE, excludes 0), but
    # Holm over the 3 rows: a 3 x 0.012459 = 0.0374 < 0.05, then c 2 x 0.04434 = 0.0887: c is not marked
    c = rows["c"]
    assert math.isclose(float(c["vs_leader"]), 0.215, rel_tol=1e-6) and math.isclose(float(c["vs_leader_se"]),
                                                                                     0.015, rel_tol=1e-4)
    assert float(c["vs_leader_low"]) > 0 and math.isclose(float(c["vs_leader_p_holm"]), 0.08869, rel_tol=1e-3)
    assert math.isclose(float(a["vs_leader_p_holm"]), 0.037376, rel_tol=1e-3)
    assert (c["paired_seeds"], c["seeds"], c["status"], c["vs_leader_mark"]) == ("2", "2/3", "failed", "")
    assert float(a["effective_context"]) == 50.0 and float(a["context_seconds"]) == 3.0
    md = (tmp_path / "leaderboard.md").read_text()
    assert "| a |" in md and "+0.1067 ± 0.0120 (+0.0550 to +0.1584) * | yes |" in md
    assert "+0.0100 ± 0.0173 (-0.0645 to +0.0845) | no |" in md and "Holm's correction across the 3 model(s)" in md
    assert "c: failed: diverged at step 3" in md and "start-up 2.0 s, exact evaluation 3.0 s" in md
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_one_seed_has_no_paired_statistics(tmp_path):
    cfg = compose("compare", ["budget.tokens=1000", "seeds=[7]"])
    write_run(tmp_path / "lstm-7", 1.6)
    write_run(tmp_path / "gru-7", 1.5)
    write_outputs(tmp_path, cfg, ["lstm", "gru"], [7])
    rows = {r["model"]: r for r in csv.DictReader((tmp_path / "leaderboard.csv").open())}
    assert rows["lstm"]["sign_agrees"] == "n/a (1 seed)" and rows["lstm"]["vs_leader"] == ""
    assert "| n/a (1 seed) | n/a (1 seed) |" in (tmp_path / "leaderboard.md").read_text()
    assert paired_difference({1: 2.0}, {1: 1.0, 2: 1.1}) == {"n": 1, "mean": None, "se": None, "agree": None,
                                                             "mark": False, "t": None, "p": None, "low": None,
                                                             "high": None}


def test_the_budget_goes_to_train_and_wandb_runs_share_a_group(tmp_path):
    cfg = compose("compare", pack_args(["budget.tokens=100000", "budget.evals=4", "logger=wandb"]))
    overrides, train_cfg = plan_entry(cfg, {"lstm": ["data.batch_size=10"]}, "lstm", 7)
    assert overrides[-2:] == ["budget.tokens=100000", "budget.evals=4"]
    assert not any(o.startswith(("trainer.max_steps", "trainer.max_time", "trainer.val_check")) for o in overrides)
    assert train_cfg.seed == 7 and train_cfg.data.batch_size == 10 and train_cfg.budget.tokens == 100000
    group_wandb(train_cfg, tmp_path / "lstm-7")
    assert train_cfg.logger.wandb.group == f"compare-{tmp_path.name}" and train_cfg.logger.wandb.name == "lstm-7"


def test_the_transformer_trains_and_is_scored_on_its_recipe_window():
    # CPU: 64 characters, measured to beat 128 and 256 within the budget (the recipe says so); GPU: nanoGPT's 256
    for recipe, window in (("cpu", 64), ("gpu", 256)):
        cfg = compose("compare", pack_args(["budget.seconds=70", f"recipes={recipe}"]))
        recipes, _, _ = selection(cfg)
        _, gpu_cfg = plan_entry(cfg, recipes, "transformer", 1)
        assert gpu_cfg.data.block_size == window and gpu_cfg.model.block_size == window
    cfg = compose("compare", pack_args(["budget.seconds=70", "recipes=cpu"]))
    recipes, _, _ = selection(cfg)
    _, train_cfg = plan_entry(cfg, recipes, "transformer", 1)
    assert train_cfg.data.batch_size * train_cfg.data.block_size == 2048  # as 32 x 64 for the others
    assert train_cfg.budget.seconds == 70 and train_cfg.budget.evals == 6


@pytest.mark.parametrize("key, value", [("models", {"a": 1}), ("seeds", "abc"), ("recipes", [1, 2]),
                                        ("overrides", {"a": 1}), ("budget.seconds", "abc"), ("budget.evals", "abc"),
                                        ("context", "maybe"), ("context_positions", "abc"),
                                        ("context_seeds", "abc")])
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
    assert folder("budget.seconds=45", "recipes=cpu", "context=false") == "hydra.run.dir='outputs/compare/cpu-45s'"
    tuned = folder("budget.seconds=45", "recipes=cpu", "model.dropout=0.1")
    assert tuned.startswith("hydra.run.dir='outputs/compare/cpu-45s-") and tuned == folder(
        "recipes=cpu", "model.dropout=0.1", "budget.seconds=45")
    cfg = compose("compare", ["budget.seconds=45", "hydra.run.dir=/x"], return_hydra_config=True)
    assert default_dir(cfg, ["a"]) == ["a"]  # a folder the command names is kept


def test_context_report_draws_each_model_and_checks_the_claims(tmp_path):
    from charlm.compare import context_report

    out = tmp_path / "cmp"
    runs = {"rnn": {1: 3.0, 2: 2.5, 4: 2.2, 8: 2.01, 16: 2.0}, "lstm": {1: 3.0, 2: 2.6, 4: 2.3, 8: 2.1, 16: 2.015}}
    for m, curve in runs.items():
        (out / f"{m}-1").mkdir(parents=True)
        (out / f"{m}-1" / "context.json").write_text(json.dumps(
            {"context_use": {str(k): v for k, v in curve.items()}, "full_context_loss": 2.0, "positions": 100,
             "chars_per_word": 5.0}))
    assert context_report(out, ["rnn", "lstm", "gru"], [1, 2])      # gru has no run: left out
    md = (out / "context.md").read_text()
    # within 1% of 2.0 means <= 2.02: the rnn gets there at k=8, the lstm at k=16
    assert "- rnn: full context 2.0000 nats, k=1 3.0000, effective context 8 chars (100 positions)." in md
    assert "- lstm: full context 2.0000 nats, k=1 3.0000, effective context 16 chars (100 positions)." in md
    assert "a vanilla RNN about 7\": measured 8 chars within 1% of full context: agrees" in md
    assert "an LSTM keeps about 100 steps\": measured 16 chars within 1% of full context: disagrees (shorter)" in md
    assert (out / "context.png").stat().st_size > 0
    assert not context_report(tmp_path / "none", ["rnn"], [1])
