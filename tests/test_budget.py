"""Budgets and schedules on progress: the LR reaches its floor when the budget ends, a tokens budget is a
stated number of steps, a budget validates exactly budget.evals times (the last at its end), a seconds budget
keeps its fraction of a second, a resumed seconds budget ends at the same total, the progress bar counts the
budget, every scheduler option runs on progress, an extended run never raises its LR, bad budgets are one
line, and two DDP ranks under a seconds budget keep one clock."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
from conftest import TINY, run_cli

from charlm import cli
from charlm.train import run
from charlm.training.budget import BudgetBar, BudgetClock
from charlm.training.build import build
from charlm.training.schedule import one_cycle, warmup_cosine

LR = 4e-3
QUICK = [*TINY, "sample.n_chars=0", "eval.window_batches=0", "eval.max_chars=2000", f"optim.lr={LR}",
         "model.hidden_dim=16", "model.embed_dim=8"]


def train(tmp_path, *overrides, name="run", callbacks=()) -> dict:
    """A tiny in-process run; warmup_cosine (the default) gets a 2-step warmup."""
    warm = [] if any(o.startswith("scheduler=") for o in overrides) else ["scheduler.warmup_steps=2"]
    cfg = cli.compose("train", [*QUICK, *warm, *overrides])
    return run(cfg, tmp_path / name, "lstm", callbacks)


class Validations(L.Callback):
    """The step of every validation during training."""

    def __init__(self):
        self.steps = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def lrs(run_dir) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    key = min(k for k in rows[0] if k.startswith("lr-AdamW"))  # one column per param group: lr-AdamW[/pg1]
    return [float(r[key]) for r in rows if r.get(key)]


# ---- the schedules as functions of progress (values computed by hand) ------------------------------

def test_warmup_cosine_values():
    s = warmup_cosine(warmup_steps=4, min_lr_ratio=0.1)
    assert s.factor(0, 0.0) == pytest.approx(0.25)          # (0+1)/4 of the way up, no decay yet
    assert s.factor(10, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)  # cos(pi/2) = 0: halfway down
    assert s.factor(10, 1.0) == pytest.approx(0.1)           # the floor at the end


def test_warmup_ends_by_a_tenth_of_a_short_run():
    s = warmup_cosine(warmup_steps=100, min_lr_ratio=0.1)
    assert s.factor(0, 0.0) == pytest.approx(0.01)                     # (0+1)/100: the step rule
    assert s.factor(1, 1 / 20) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 20))))
    assert s.factor(2, 2 / 20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 10)))  # warm at 10%


def test_one_cycle_values():
    s = one_cycle(pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    assert s.factor(0, 0.0) == pytest.approx(0.1)    # starts at lr / div_factor
    assert s.factor(5, 0.25) == pytest.approx(1.0)   # the peak at pct_start
    assert s.factor(9, 1.0) == pytest.approx(1e-3)   # lr / (div * final_div) at the end


def test_extension_never_raises_the_lr():
    s = warmup_cosine(warmup_steps=0, min_lr_ratio=0.1)
    before = s.factor(15, 0.6)
    s.extend(old_progress=0.6, new_progress=0.3)  # the horizon doubled at 60% of the old run
    after = [s.factor(15 + i, 0.3 + 0.7 * i / 20) for i in range(21)]
    assert after[0] == pytest.approx(before)
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert after[-1] == pytest.approx(0.1)


# ---- real runs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler,floor", [("warmup_cosine", 0.1), ("one_cycle", 1 / 250_000), ("constant", 1.0)])
def test_every_scheduler_runs_on_progress_in_a_step_run(tmp_path, scheduler, floor):
    over = [f"scheduler={scheduler}", "trainer.max_steps=8", "trainer.val_check_interval=8"]
    if scheduler != "one_cycle":
        over.append("scheduler.warmup_steps=2")
    r = train(tmp_path, *over)
    assert r["steps"] == 8
    assert r["final_lr"] == pytest.approx(LR * floor, rel=1e-6)


def test_tokens_budget_maps_to_the_stated_steps(tmp_path):
    # 8 x 16 tokens a step (TINY: data.batch_size=8, data.block_size=16): 1000 tokens -> ceil(1000 / 128) = 8
    r = train(tmp_path, "budget.tokens=1000", "scheduler=one_cycle")
    assert r["steps"] == 8 and r["budget"]["max_steps"] == 8 and r["budget"]["kind"] == "tokens"
    assert r["final_lr"] == pytest.approx(LR / 250_000, rel=1e-6)


def test_tokens_budget_validates_exactly_evals_times_the_last_at_the_end(tmp_path):
    # 2560 tokens / 128 a step = 20 steps; 6 validations where step / 20 reaches k / 6: ceil(20 k / 6) for
    # k = 1..5 (4, 7, 10, 14, 17), and the last at the end (20); an interval of 20 // 6 = 3 gave 7
    seen = Validations()
    r = train(tmp_path, "budget.tokens=2560", "budget.evals=6", callbacks=[seen])
    assert r["steps"] == 20 and seen.steps == [4, 7, 10, 14, 17, 20]


def test_seconds_budget_ends_at_the_floor_and_the_bar_counts_seconds(tmp_path):
    # 10.5 s, not 10 (Lightning's DD:HH:MM:SS has whole seconds): the fraction is kept
    cfg = cli.compose("train", [*QUICK, "scheduler.warmup_steps=2", "budget.seconds=10.5", "budget.evals=2"])
    seen = Validations()
    built = build(cfg, tmp_path, "lstm", extra_callbacks=[seen])
    built.trainer.fit(built.module, datamodule=built.dm)
    clock, bar = built.callback(BudgetClock), built.callback(BudgetBar)
    assert clock.elapsed() >= 10.5 and clock.shared_elapsed >= 10.5
    assert bar.train_progress_bar.total == 10.5          # the bar's total is the budget, not a step limit
    assert 0 < bar.train_progress_bar.n <= 10.5
    assert len(seen.steps) == 2 and seen.steps[-1] == built.trainer.global_step  # the last at the end
    assert built.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.1, rel=1e-6)
    assert built.trainer.global_step > 0


def test_resumed_seconds_budget_ends_at_the_same_total(tmp_path):
    first = train(tmp_path, "budget.seconds=10", "budget.evals=5", "stop_at_step=3", name="first")
    used_first = torch.load(first["last_ckpt"], weights_only=True)["callbacks"]
    timer_state = next(v for k, v in used_first.items() if k.startswith("Timer"))
    before = timer_state["time_elapsed"]["train"]
    assert before < 10
    second = train(tmp_path, "budget.seconds=10", "budget.evals=5", f"ckpt_path={first['last_ckpt']}", name="second")
    assert second["budget_seconds_used"] >= 10                       # the clock continued from `before`
    assert second["budget_seconds_used"] < 10 + 5                    # and ended at the same total budget
    assert second["steps"] > first["steps"]


def test_extending_a_finished_run_never_raises_the_lr(tmp_path):
    over = ["logger=csv", "trainer.log_every_n_steps=1", "callbacks.lr_monitor.logging_interval=step"]
    first = train(tmp_path, *over, "trainer.max_steps=15", "trainer.val_check_interval=15", name="first")
    train(tmp_path, *over, "trainer.max_steps=30", "trainer.val_check_interval=15",
          f"ckpt_path={first['last_ckpt']}", name="second")
    extra = lrs(tmp_path / "second")
    assert len(extra) >= 10
    assert all(b <= a * (1 + 1e-9) for a, b in zip(extra, extra[1:]))
    assert extra[-1] == pytest.approx(LR * 0.1, rel=1e-3)


@pytest.mark.parametrize("args,expected", [
    (["budget.seconds=20", "budget.tokens=1000"], "not both"),
    (["budget.seconds=5"], "budget.seconds=5"),
    (["budget.tokens=10"], "budget.tokens=10"),
])
def test_bad_budgets_are_one_line(tmp_path, args, expected):
    out = tmp_path / "run"
    proc = run_cli("charlm.train", *TINY, *args, f"hydra.run.dir={out}", check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_results_record_the_budget(tmp_path):
    r = train(tmp_path, "budget.tokens=640")  # 5 steps of 128 tokens
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["budget"] == {"kind": "tokens", "seconds": None, "tokens": 640, "evals": None, "max_steps": 5}
    assert saved["steps"] == 5 and saved["tokens"] == 640
    assert math.isfinite(saved["final_eval_seconds"]) and r["startup_seconds"] >= 0


RANK_TRACE = '''
import json
from pathlib import Path

import lightning as L


class RankTrace(L.Callback):
    """This rank's LR at every step, and its validation steps, in DIR/rankR.json at the end."""

    def __init__(self, path):
        self.path, self.lrs, self.vals = Path(path), [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]])

    def on_validation_end(self, trainer, pl_module):
        self.vals.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        out = {"steps": trainer.global_step, "lrs": self.lrs, "vals": self.vals}
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))
'''


def test_two_ddp_ranks_keep_one_clock_and_a_clean_output(tmp_path):
    """Under budget.seconds, each rank's own timer would give each its own LR and its own validation and
    stop steps: rank 0's clock is shared, so both ranks apply the same LR at every step, validate at the same
    steps (budget.evals of them) and stop at the same step. Lightning's advice and advertising stay out."""
    (tmp_path / "rank_trace.py").write_text(RANK_TRACE)
    proc = run_cli("charlm.train", "trainer=ddp_cpu", "logger=csv", "data.batch_size=8", "data.block_size=16",
                   "eval.chunk=512", "eval.window_batches=0", "eval.max_chars=2000", "model.hidden_dim=16",
                   "model.embed_dim=8", "sample.n_chars=0", "budget.seconds=10", "budget.evals=3",
                   "callbacks.progress_bar=null", "++trainer.enable_progress_bar=false",
                   "+callbacks.trace._target_=rank_trace.RankTrace", f"+callbacks.trace.path={tmp_path}",
                   f"hydra.run.dir={tmp_path / 'run'}", env={"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert len(ranks[0]["vals"]) == 3 and ranks[0]["vals"] == ranks[1]["vals"]
    assert ranks[0]["vals"][-1] == ranks[0]["steps"]
    assert len(ranks[0]["lrs"]) == ranks[0]["steps"] and ranks[0]["lrs"] == ranks[1]["lrs"]  # exactly equal
    out = proc.stdout + proc.stderr
    assert "sync_dist" not in out and "litlogger" not in out, out[-3000:]
