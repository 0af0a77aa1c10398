"""Run folders are claimed atomically, never clobbered; resume continues where the run was and keeps its best."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from conftest import TINY, run_cli

from charlm.cli import compose
from charlm.training import rundir


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_claim_gives_two_runs_of_one_second_two_folders(tmp_path):
    a = rundir.claim(tmp_path / "12-00-00-lstm")
    b = rundir.claim(tmp_path / "12-00-00-lstm")
    assert a.name == "12-00-00-lstm" and b.name == "12-00-00-lstm-2" and a.is_dir() and b.is_dir()


def test_plan_claims_a_fresh_folder_and_resume_continues_in_the_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose("train", ["model=gru"], return_hydra_config=True)
    first, second = rundir.plan(cfg, []), rundir.plan(cfg, [])
    assert first != second and all(a.startswith("hydra.run.dir=") for a in first + second)
    ckpt = tmp_path / "outputs" / "old" / "checkpoints" / "last.ckpt"
    resumed = rundir.plan(compose("train", [f"ckpt_path={ckpt}"], return_hydra_config=True), [])
    assert resumed == [f"hydra.run.dir='{ckpt.parent.parent}'"]


def test_resume_into_a_folder_holding_another_run_is_refused(trained_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)  # another finished run (a copy: checkpoints, results.json, .hydra/)
    before = folder_state(other)
    proc = run_cli("charlm.train", *TINY, f"ckpt_path={trained_run}/checkpoints/last.ckpt", f"hydra.run.dir={other}",
                   check=False)
    assert proc.returncode == 2 and "holds another run" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert folder_state(other) == before  # not even .hydra/ was rewritten


def test_train_log_holds_what_the_run_printed(trained_run):
    log = (trained_run / "train.log").read_text()
    assert "charlm: lstm" in log and "bits/char on the yardstick" in log and "sample:" in log
    assert "\r" not in log


def test_resume_into_another_folder_keeps_the_best_score(tmp_path):
    """Lightning's ModelCheckpoint forgets the best score when the folder changes, so the first (maybe worse)
    validation after a resume would become best.ckpt; charlm's BestCheckpoint copies the best along."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from charlm.training.callbacks import BestCheckpoint

    old = tmp_path / "A" / "checkpoints"
    old.mkdir(parents=True)
    (old / "best.ckpt").write_bytes(b"the best weights")
    state = {"dirpath": str(old), "best_model_path": str(old / "best.ckpt"), "best_model_score": torch.tensor(1.23),
             "kth_best_model_path": str(old / "best.ckpt"), "kth_value": torch.tensor(1.23),
             "best_k_models": {str(old / "best.ckpt"): torch.tensor(1.23)}, "last_model_path": str(old / "last.ckpt")}
    plain = ModelCheckpoint(dirpath=str(tmp_path / "B" / "checkpoints"), monitor="val/loss")
    plain.load_state_dict(dict(state))
    assert plain.best_model_score is None  # the failure mode
    ours = BestCheckpoint(dirpath=str(tmp_path / "B" / "checkpoints"), monitor="val/loss")
    ours.load_state_dict(dict(state))
    assert abs(float(ours.best_model_score) - 1.23) < 1e-6
    assert Path(ours.best_model_path) == tmp_path / "B" / "checkpoints" / "best.ckpt"
    assert Path(ours.best_model_path).read_bytes() == b"the best weights"


def test_best_checkpoints_key_is_lightnings_and_is_built_once():
    """The callback-state key in a checkpoint stays Lightning's (older checkpoints resume), built once
    rather than at every hook call."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from charlm.training.callbacks import BestCheckpoint

    kw = {"monitor": "val/loss", "mode": "min", "save_top_k": 1, "save_last": True}
    ours = BestCheckpoint(**kw)
    assert ours.state_key == ModelCheckpoint(**kw).state_key.replace("ModelCheckpoint", "BestCheckpoint")
    assert "'monitor': 'val/loss'" in ours.state_key
    ours.monitor = "changed"  # a key built at the first read: later reads do not rebuild it
    assert "'monitor': 'val/loss'" in ours.state_key
