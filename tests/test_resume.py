"""Exact resume: a run stopped (or killed) and resumed logs the same per-step losses as one straight run."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, run_cli

STEPS = ["trainer.max_steps=16", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1",
         "logger=csv", "model.dropout=0.3", "model.num_layers=2"]


def losses(run_dir) -> dict[int, str]:
    """step -> train/loss as written (full-precision text) in the CSV log."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize("sampling", ["random", pytest.param("stream", marks=pytest.mark.slow)])  # the same resume path
def test_stop_and_resume_matches_straight_run(tmp_path, sampling):
    args = [*TINY, *STEPS, f"data.sampling={sampling}"]
    run_cli("charlm.train", *args, f"hydra.run.dir={tmp_path / 'straight'}")
    run_cli("charlm.train", *args, "stop_at_step=8", f"hydra.run.dir={tmp_path / 'first'}")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 8
    run_cli("charlm.train", *args, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}")
    straight, first, resumed = losses(tmp_path / "straight"), losses(tmp_path / "first"), losses(tmp_path / "resumed")
    assert len(straight) == 16 and len(resumed) == 8
    assert {s: straight[s] for s in first} == first
    assert {s: straight[s] for s in resumed} == resumed  # bit-identical per-step losses


def test_resume_after_sigkill(tmp_path):
    args = [*TINY, *STEPS, "trainer.max_steps=200", "trainer.val_check_interval=50"]
    straight_dir = tmp_path / "straight"
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "charlm.train", *args, f"hydra.run.dir={killed_dir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint was written before the kill"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 50 <= step < 200
    run_cli("charlm.train", *args, f"hydra.run.dir={straight_dir}")
    run_cli("charlm.train", *args, f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'resumed'}")
    straight, resumed = losses(straight_dir), losses(tmp_path / "resumed")
    assert min(resumed) == step and len(resumed) == 200 - step  # steps are logged 0-based
    assert {s: straight[s] for s in resumed} == resumed
