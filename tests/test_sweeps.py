"""Sweeps and scale-out, for real on tiny settings: a Hydra multirun and its summary, an Optuna search
resumed and reused as an experiment, a two-process DDP run, and the W&B sweep's command lines."""

from __future__ import annotations

import csv
import json
import math
import types

import pytest
import torch
import yaml
from conftest import ROOT, TINY, run_cli

from charlm.scoring.summary import write_summary

SUMMARY_CALLBACK = "++hydra.callbacks.summary._target_=charlm.scoring.summary.SweepSummary"  # ++: train.yaml has it


def tiny(*drop: str) -> list[str]:
    """TINY without the overrides of the keys in `drop`."""
    return [a for a in TINY if a.split("=")[0] not in drop]


def test_multirun_summary_reports_a_failed_job(tmp_path):
    proc = run_cli("charlm.train", "-m", *TINY, "model.dropout=0.0,1.5", f"hydra.sweep.dir={tmp_path}",
                   SUMMARY_CALLBACK, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the sweep ran to its end, then said a job failed
    assert "error: 1 of 2 jobs failed" in proc.stderr
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    ok, failed = rows
    results = json.loads((tmp_path / ok["job"] / "results.json").read_text())
    assert math.isclose(float(ok["best_val_bpc"]), results["best_val_bpc"]) and ok["model"] == "lstm"
    assert ok["protocol"].startswith("8 streams")  # the yardstick's protocol, shown beside the figure
    assert "model.dropout=0.0" in ok["overrides"]
    assert "model.dropout=1.5" in failed["overrides"] and "must be in [0, 1)" in failed["error"]
    assert not (tmp_path / failed["job"] / "results.json").exists()
    md = (tmp_path / "summary.md").read_text()
    assert "| job | status | best_val_bpc |" in md and "| failed |" in md


@pytest.mark.slow  # W&B grouping of multirun jobs; the multirun itself is covered by the summary test
def test_each_job_has_its_own_wandb_run_even_after_a_failure(tmp_path):
    # lr=1e4 diverges at step 1 (after its W&B run started); the next job must not log into that run
    run_cli("charlm.train", "-m", *tiny("logger"), "logger=wandb", "optim.lr=1e4,3e-3", f"hydra.sweep.dir={tmp_path}",
            SUMMARY_CALLBACK, check=False, env={"WANDB_MODE": "offline"})
    assert [r["status"] for r in csv.DictReader((tmp_path / "summary.csv").open())] == ["ok", "failed"]
    for job in ("0", "1"):
        assert len(list((tmp_path / job / "wandb").glob("offline-run-*"))) == 1, job


def test_multirun_refuses_several_devices_per_job(tmp_path):
    proc = run_cli("charlm.train", "-m", "trainer=ddp_cpu", *tiny("trainer"), "model.hidden_dim=16,32",
                   f"hydra.sweep.dir={tmp_path}", SUMMARY_CALLBACK, check=False)
    assert proc.returncode == 1 and "re-run the whole sweep" in proc.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_summary_sorts_by_val_bpc_and_puts_failures_last(tmp_path):
    for job, bpc in (("0", 2.5), ("1", None), ("2", 1.5), ("3", 3.0)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "job.json").write_text(json.dumps(
            {"num": int(job), "overrides": [f"optim.lr={job}"], "status": "failed" if bpc is None else "ok",
             "error": "ConfigError: bad" if bpc is None else ""}))
        if bpc is not None:
            results = {"best_val_bpc": bpc, "best_val_loss": bpc * math.log(2)}
            (tmp_path / job / "results.json").write_text(json.dumps(results))
    rows = write_summary(tmp_path)
    assert [r["job"] for r in rows] == ["2", "0", "3", "1"]
    assert (tmp_path / "summary.md").read_text().count("\n| ") == 4


def test_optuna_search_resumes_and_its_best_trial_is_an_experiment(tmp_path):
    optuna = pytest.importorskip("optuna")
    sweep_dir = tmp_path / "sweep"
    args = ["hparams_search=lstm_lr", f"sweep_dir={sweep_dir}", *tiny("model.hidden_dim"),
            "model.hidden_dim=choice(16, 32)", "optim.lr=tag(log, interval(1e-3, 3e-2))"]
    out = run_cli("charlm.sweep", *args, "n_trials=3").stdout
    assert "0 trials done, 3 to run" in out
    storage = f"sqlite:///{sweep_dir / 'study.db'}"
    study = optuna.load_study(study_name="lstm_lr", storage=storage)
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    assert all(t.intermediate_values for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    best = study.best_trial
    text = (sweep_dir / "best.yaml").read_text()
    assert text.startswith("# @package _global_")
    exp = yaml.safe_load(text)
    assert exp["optim"]["lr"] == best.params["optim.lr"]
    assert exp["model"]["hidden_dim"] == best.params["model.hidden_dim"]
    assert {"override /model": "lstm"} in exp["defaults"]
    assert len(list(csv.DictReader((sweep_dir / "summary.csv").open()))) == 3

    out = run_cli("charlm.sweep", *args, "n_trials=4").stdout  # the same command, one more trial wanted
    assert "3 trials done, 1 to run" in out
    study = optuna.load_study(study_name="lstm_lr", storage=storage)
    assert len(study.trials) == 4
    assert study.trials[3].params != study.trials[0].params  # a resumed sampler does not replay its draws

    run_dir = tmp_path / "best_run"
    best = study.best_trial
    run_cli("charlm.train", "--config-dir", str(sweep_dir), "experiment=best", "trainer=cpu",
            f"hydra.run.dir={run_dir}")
    results = json.loads((run_dir / "results.json").read_text())
    assert math.isclose(results["val_loss"], best.value, rel_tol=1e-4)  # the same run again


def test_pruning_callback_reports_val_loss_and_stops_the_trial():
    optuna = pytest.importorskip("optuna")
    from charlm.sweep import PruneOnVal, distribution

    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    study = optuna.create_study(pruner=Always())
    trial = study.ask({"optim.lr": distribution("optim.lr", "tag(log, interval(1e-4, 1e-2))")})
    metrics = {"val/loss": torch.tensor(3.5)}
    trainer = types.SimpleNamespace(sanity_checking=False, global_step=6, callback_metrics=metrics)
    with pytest.raises(optuna.TrialPruned, match="step 6"):
        PruneOnVal(trial).on_validation_end(trainer, None)
    assert study.trials[0].intermediate_values == {6: 3.5}


def test_search_space_syntax():
    pytest.importorskip("optuna")
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from charlm.sweep import as_override, distribution

    assert distribution("a", "tag(log, interval(1e-4, 1e-2))") == FloatDistribution(1e-4, 1e-2, log=True)
    assert distribution("a", "choice(128, 256)") == CategoricalDistribution([128, 256])
    assert distribution("a", "tag(int, interval(1, 4))") == IntDistribution(1, 4)
    assert distribution("a", "range(1, 9, 2)") == IntDistribution(1, 7, step=2)
    assert as_override("optim.lr", 1e-5) == "optim.lr=1e-05" and as_override("model", "gru") == "model=gru"


def yardstick_one_process(ckpt: str, chunk: int) -> float:
    """The yardstick of a checkpoint in this process: 8 streams, state carried, every val char once."""
    from charlm.checkpoint import load_model
    from charlm.data.datamodule import CharDataModule
    from charlm.yardstick import eval_dataset, score

    model, vocab, _ = load_model(ckpt)
    dm = CharDataModule(block_size=16, batch_size=8, vocab=vocab)
    dm.prepare()
    total, count = score(model, eval_dataset(dm.splits["val"], None, 8, chunk, None, 64))
    assert count == len(dm.splits["val"]) - 1
    return total / count


def test_ddp_two_cpu_processes_stream_mode(tmp_path):
    """Stream mode (the RNN default) under DDP: each rank trains its own streams and scores its own
    share of the val streams; rank 0 alone writes; the summed figure equals the one-process yardstick."""
    run_cli("charlm.train", "trainer=ddp_cpu", *tiny("trainer", "logger"), "logger=csv", "data.sampling=stream",
            f"hydra.run.dir={tmp_path}", timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]  # rank 0 only
    assert results["steps"] == 12 and list(tmp_path.rglob("results.json")) == [tmp_path / "results.json"]
    assert results["world_size"] == 2 and results["sampling"] == "stream"
    assert results["tokens"] == 12 * 8 * 16 * 2  # both ranks' tokens
    single = yardstick_one_process(results["best_ckpt"], chunk=512)
    assert math.isclose(results["best_val_loss"], single, rel_tol=1e-5), (results["best_val_loss"], single)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        last_val = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")][-1]
    assert math.isclose(last_val, single, rel_tol=1e-5)  # the distributed val pass: same sum as one process


def wandb_agent_args(params: dict) -> list[str]:
    """The `key=value` list a W&B agent puts in place of ${args_no_hyphens}."""
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    except ImportError:  # the agent's format, as documented: param=value
        return [f"{k}={v}" for k, v in params.items()]
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]


def sweep_combos(parameters: dict, n: int = 3) -> list[dict]:
    """n parameter sets from a W&B sweep's `parameters`: each choice and both ends of each range occur."""
    combos = []
    for i in range(n):
        combo = {}
        for key, spec in parameters.items():
            if "values" in spec:
                combo[key] = spec["values"][i % len(spec["values"])]
            elif "value" in spec:
                combo[key] = spec["value"]
            else:
                lo, hi = spec["min"], spec["max"]
                mid = math.sqrt(lo * hi) if "log" in spec.get("distribution", "") else (lo + hi) / 2
                combo[key] = [lo, hi, mid][i % 3]
        combos.append(combo)
    return combos


def test_wandb_sweep_commands_compose():
    from hydra import compose, initialize_config_dir

    from charlm.cli import CONF_DIR
    from charlm.train import check_config, pick_trainer

    spec = yaml.safe_load((ROOT / "scripts" / "wandb_sweep.yaml").read_text())
    assert spec["metric"]["name"] == "val/loss" and spec["method"] in ("bayes", "random", "grid")
    command = spec["command"]
    assert command[:4] == ["${env}", "python", "-m", "charlm.train"] and command[-1] == "${args_no_hyphens}"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for combo in sweep_combos(spec["parameters"]):
            args = [c for c in command[4:-1]] + wandb_agent_args(combo)
            cfg = compose(config_name="train", overrides=pick_trainer(args))
            check_config(cfg)
            for key, value in combo.items():
                if key in ("model",):  # a config group: the choice picks the file
                    assert cfg.model.cell == value, args
                else:
                    got = cfg
                    for part in key.split("."):
                        got = got[part]
                    assert got == pytest.approx(value), (key, args)


def test_slurm_launcher_follows_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from charlm.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (4, 4, 2)

