"""`python -m charlm.train model=lstm`: train a character-level LM, write checkpoints and results.json.

Nothing here is specific to an architecture: the model comes from `conf/model/NAME.yaml` through
the builder. The run reads as a story: check, build, fit, evaluate the best checkpoint with the
yardstick, write results.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from charlm.checkpoint import check_checkpoint, command_targets, read_checkpoint
from charlm.cli import CONF_DIR, hydra_main, in_multirun
from charlm.config import check_train
from charlm.data.vocab import CharVocab
from charlm.errors import ConfigError
from charlm.scoring.results import finish_wandb, score_run
from charlm.training import rundir
from charlm.training.budget import check_budget
from charlm.training.build import build


def pick_trainer(argv: list[str]) -> list[str]:
    """Default `trainer=gpu` when CUDA is present, `trainer=mps` on Apple silicon, `trainer=cpu`
    otherwise (an explicit choice wins)."""
    if any(a.split("=")[0].lstrip("+~") == "trainer" for a in argv):
        return argv
    if torch.cuda.is_available():
        return argv + ["trainer=gpu"]
    mps = getattr(torch.backends, "mps", None)
    return argv + ["trainer=mps" if mps is not None and mps.is_available() else "trainer=cpu"]


def check_sweep_devices(cfg: DictConfig) -> None:
    """Refuse several devices per job inside a Hydra multirun unless SLURM starts the ranks: Lightning's
    DDP launcher re-runs sys.argv, which there is the whole sweep (docs/sweeps.md)."""
    import os

    from omegaconf import OmegaConf

    devices, accelerator = cfg.trainer.get("devices", 1), str(cfg.trainer.get("accelerator", "auto"))
    n = len(devices) if OmegaConf.is_list(devices) else int(devices) if str(devices).lstrip("-").isdigit() else 0
    several = n > 1 or n == -1 or (n == 0 and accelerator != "cpu") or int(cfg.trainer.get("num_nodes", 1)) > 1
    if several and in_multirun() and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(
            f"trainer.devices={devices} in a Hydra multirun: Lightning's DDP would re-run the whole sweep in each "
            "extra process; sweep with one device per job (trainer=gpu) or a launcher per job (hydra/launcher=slurm)"
        )


def check_config(cfg: DictConfig) -> None:
    """Types, ranges and choices of every key (charlm.config), and what needs the whole config."""
    check_train(cfg)
    check_budget(cfg)
    check_sweep_devices(cfg)
    if cfg.get("ckpt_path"):  # a resumed checkpoint's configs are data, checked as the command line's are
        check_checkpoint(cfg.ckpt_path, trusted=command_targets(cfg))


def run(cfg: DictConfig, run_dir: Path | None = None, model_name: str | None = None,
        extra_callbacks: Sequence = ()) -> dict:
    """Train as `cfg` says; return (and write) the run's results. `extra_callbacks`: more Lightning
    callbacks (charlm.sweep's pruning)."""
    started = time.perf_counter()  # start-up (config, data, model, trainer) is reported beside the budget
    check_config(cfg)
    run_dir, model_name = rundir.current(run_dir, model_name)
    rundir.check(cfg, run_dir)
    resume = read_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    vocab = CharVocab.from_dict(resume["hyper_parameters"]["vocab"]) if resume else None
    built = build(cfg, run_dir, model_name, vocab, resume.get("wandb_id") if resume else None, extra_callbacks)
    dm = built.dm
    print(f"charlm: {model_name} ({built.params:,} params), {len(dm.vocab)}-char vocab, "
          f"{len(dm.splits['train']):,} train / {len(dm.splits['val']):,} val chars -> {run_dir}")
    try:
        built.trainer.fit(built.module, datamodule=dm, ckpt_path=cfg.ckpt_path)
        if built.trainer.global_rank != 0:
            return {}
        results = score_run(built, cfg, run_dir, resume, started)  # the yardstick, results.json, the report
    finally:
        finish_wandb(built, failed=sys.exc_info()[0] is not None)
    return results


def _job(cfg: DictConfig) -> float | None:
    run_dir, _ = rundir.current()
    with rundir.tee(run_dir / "train.log"):
        return (run(cfg) or {}).get("best_val_loss")


def main() -> None:
    hydra_main("train", _job, argv_hook=pick_trainer,
               check=lambda cfg: (check_config(cfg), rundir.check(cfg, rundir.planned(cfg))), plan=rundir.plan)


if __name__ == "__main__":
    main()


__all__ = ["CONF_DIR", "check_config", "main", "pick_trainer", "run"]
