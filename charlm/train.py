"""`python -m charlm.train model=lstm`: train a character-level LM, write checkpoints and results.json.

Nothing here is specific to an architecture: the model comes from `conf/model/NAME.yaml`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from charlm.errors import CONF_DIR, ConfigError, report_user_errors


def pick_trainer(argv: list[str]) -> list[str]:
    """Default `trainer=gpu` when CUDA is present, `trainer=cpu` otherwise (an explicit choice wins)."""
    if any(a.split("=")[0].lstrip("+~") == "trainer" for a in argv):
        return argv
    return argv + ["trainer=gpu" if torch.cuda.is_available() else "trainer=cpu"]


class TrainClock:
    """Wall time spent training, without validation: tokens/s that is not diluted by evaluation."""

    def __init__(self):
        import lightning as L

        clock = self

        class _Cb(L.Callback):
            def on_train_start(self, trainer, pl_module):
                clock.start, clock.val = time.perf_counter(), 0.0

            def on_validation_start(self, trainer, pl_module):
                _sync()
                clock._v0 = time.perf_counter()

            def on_validation_end(self, trainer, pl_module):
                _sync()
                clock.val += time.perf_counter() - clock._v0

            def on_train_end(self, trainer, pl_module):
                _sync()
                clock.end = time.perf_counter()

        self.callback = _Cb()
        self.start = self.end = None
        self.val = 0.0

    @property
    def train_seconds(self) -> float:
        return (self.end - self.start - self.val) if self.start and self.end else float("nan")


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def stop_at(step: int):
    """A callback that stops training after the validation (and checkpoint) at `step`, as an interruption would."""
    import lightning as L

    class _StopAt(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.global_step >= step:
                trainer.should_stop = True

    return _StopAt()


TOP_KEYS = {
    "model", "data", "trainer", "logger", "optim", "scheduler", "seed", "ckpt_path", "stop_at_step",
    "clip", "sample", "divergence_factor", "gradflow_every",
}


def _accepted(target) -> tuple[set[str], bool]:
    """Keyword names a callable accepts, and whether it also takes **kwargs."""
    import inspect

    params = inspect.signature(target).parameters.values()
    return {p.name for p in params}, any(p.kind is p.VAR_KEYWORD for p in params)


def check_keys(cfg: DictConfig) -> None:
    """Reject misspelt keys (in YAML files or `+key=` overrides), naming them."""
    import lightning as L
    from hydra.utils import get_method

    from charlm.data import CharDataModule

    for key in cfg:
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(TOP_KEYS))})")
    data_cls = get_method(cfg.data._target_) if "_target_" in cfg.data else CharDataModule
    groups = {
        "data": (data_cls, {"name", "_target_"}),
        "trainer": (L.Trainer, set()),
        "clip": (None, {"algorithm", "value"}),
        "sample": (None, {"prompt", "n_chars", "temperature"}),
        "logger": (None, {"kind", "project", "mode", "name", "id"}),
    }
    for name in ("model", "optim", "scheduler"):
        if cfg.get(name) and "_target_" in cfg[name]:
            try:
                target = get_method(cfg[name]._target_)
            except Exception:
                raise ConfigError(f"{name}._target_={cfg[name]._target_}: no such class or function") from None
            groups[name] = (target, {"_target_", "_partial_", "compile"})
    for name, (target, extra) in groups.items():
        known, open_ended = _accepted(target) if target is not None else (set(), False)
        known |= extra
        for key in cfg.get(name) or {}:
            if key not in known and not open_ended:
                raise ConfigError(f"unknown config key {name}.{key} (known: {', '.join(sorted(known - {'self'}))})")


def check_sweep_devices(cfg: DictConfig) -> None:
    """Refuse several devices per job inside a Hydra multirun unless SLURM starts the ranks: Lightning's
    DDP launcher re-runs sys.argv, which there is the whole sweep (docs/sweeps.md)."""
    from charlm.errors import _in_multirun

    devices, accelerator = cfg.trainer.get("devices", 1), str(cfg.trainer.get("accelerator", "auto"))
    n = len(devices) if OmegaConf.is_list(devices) else int(devices) if str(devices).lstrip("-").isdigit() else 0
    several = n > 1 or n == -1 or (n == 0 and accelerator != "cpu") or int(cfg.trainer.get("num_nodes", 1)) > 1
    if several and _in_multirun() and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(
            f"trainer.devices={devices} in a Hydra multirun: Lightning's DDP would re-run the whole sweep in each "
            "extra process; sweep with one device per job (trainer=gpu) or a launcher per job (hydra/launcher=slurm)"
        )


def check_config(cfg: DictConfig) -> None:
    """Reject misspelt keys and impossible values, naming the key."""
    check_keys(cfg)
    check_sweep_devices(cfg)
    positive = {
        "data.block_size": cfg.data.block_size, "data.batch_size": cfg.data.batch_size,
        "trainer.max_steps": cfg.trainer.max_steps,
    }
    for key in ("embed_dim", "hidden_dim", "num_layers", "n_layer", "n_head", "n_embd"):
        if key in cfg.model:
            positive[f"model.{key}"] = cfg.model[key]
    for key, v in positive.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{key}={v}: must be a positive integer")
    if "dropout" in cfg.model and not (0 <= float(cfg.model.dropout) < 1):
        raise ConfigError(f"model.dropout={cfg.model.dropout}: must be in [0, 1)")
    if not 0 < float(cfg.data.val_fraction) < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must be in (0, 1)")
    for key, allowed in (("sampling", ("auto", "random", "stream")), ("errors", ("strict", "replace"))):
        if key in cfg.data and cfg.data[key] not in allowed:
            raise ConfigError(f"data.{key}={cfg.data[key]}: must be one of {', '.join(allowed)}")
    if cfg.clip.algorithm not in ("norm", "value"):
        raise ConfigError(f"clip.algorithm={cfg.clip.algorithm}: must be 'norm' or 'value'")


def build_logger(cfg: DictConfig, run_dir: Path):
    """W&B (offline unless WANDB_MODE says otherwise), CSV, or nothing."""
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
        os.environ["WANDB_MODE"] = mode
        return WandbLogger(
            project=cfg.logger.project, name=cfg.logger.get("name"), save_dir=str(run_dir),
            offline=mode == "offline", id=cfg.logger.get("id"), resume="allow",
        )
    raise ConfigError(f"logger.kind={kind}: must be wandb, csv or none")


def run(cfg: DictConfig, extra_callbacks: Sequence = ()) -> dict:
    """Train as `cfg` says; return (and write) the run's results. `extra_callbacks`: more Lightning
    callbacks (charlm.sweep's pruning)."""
    import lightning as L
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_class
    from lightning.pytorch.callbacks import (
        LearningRateMonitor,
        ModelCheckpoint,
        RichProgressBar,
        TQDMProgressBar,
    )

    from charlm.checkpoint import AtomicCheckpointIO, load_charlm, read_checkpoint
    from charlm.module import CharLM
    from charlm.sample import generate
    from charlm.vocab import CharVocab

    check_config(cfg)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    model_name = hc.runtime.choices.get("model", "model")
    ckpt_dir = run_dir / "checkpoints"
    if cfg.ckpt_path is None and (ckpt_dir / "last.ckpt").exists():
        raise ConfigError(
            f"{run_dir} already holds a run; resume it with ckpt_path={ckpt_dir / 'last.ckpt'} "
            "or pick another hydra.run.dir"
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")

    resume = read_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    vocab = CharVocab.from_dict(resume["hyper_parameters"]["vocab"]) if resume else None
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if data_cfg.get("sampling") == "auto":  # each model class says how it learns best
        model_cls = get_class(cfg.model._target_)
        data_cfg["sampling"] = getattr(model_cls, "preferred_sampling", "random")
    data_cls = get_class(data_cfg.pop("_target_", "charlm.data.CharDataModule"))
    dm = data_cls(vocab=vocab, seed=cfg.seed, **data_cfg)
    dm.prepare()
    if len(dm.splits["val"]) < dm.block_size + 1:
        raise ConfigError(f"data.block_size={dm.block_size} is larger than the val split")

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    compile_model = bool(model_cfg.pop("compile", False))
    module = CharLM(
        model=model_cfg,
        vocab=dm.vocab.to_dict(),
        model_name=model_name,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else None,
        clip=OmegaConf.to_container(cfg.clip, resolve=True),
        carry_state=data_cfg["sampling"] == "stream",
        sample=OmegaConf.to_container(cfg.sample, resolve=True),
        divergence_factor=cfg.divergence_factor,
    )
    params = sum(p.numel() for p in module.model.parameters())
    if compile_model:
        module.model = torch.compile(module.model)

    if resume and resume.get("wandb_id") and cfg.logger.kind == "wandb" and not cfg.logger.get("id"):
        cfg.logger.id = resume["wandb_id"]  # the resumed run continues the same W&B run
    logger = build_logger(cfg, run_dir)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True) | {"params": params})
    ckpt_cb = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
        save_last=True, enable_version_counter=False, auto_insert_metric_name=False,
    )
    clock = TrainClock()
    bar = RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=50)
    callbacks = [ckpt_cb, clock.callback, bar]
    callbacks += list(getattr(dm, "callbacks", lambda: [])())  # task-specific metrics (e.g. data=recall)
    callbacks += list(extra_callbacks)
    if cfg.get("gradflow_every"):  # the gradient-flow curve every N validations (W&B plot + RUN_DIR/gradflow/)
        from charlm.gradflow import GradFlowCallback

        callbacks.append(GradFlowCallback(every_n_val=int(cfg.gradflow_every)))
    if cfg.get("stop_at_step"):
        callbacks.append(stop_at(int(cfg.stop_at_step)))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("precision") == "auto":  # each model class says what its kernels want on a GPU
        on_gpu = trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        trainer_cfg["precision"] = getattr(type(module.model), "gpu_precision", "32-true") if on_gpu else "32-true"
    trainer = L.Trainer(
        **trainer_cfg,
        logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir), enable_checkpointing=True,
        use_distributed_sampler=False,  # val batches are sharded by rank in CharDataModule (no padded repeats)
    )
    print(f"charlm: {model_name} ({params:,} params), {len(dm.vocab)}-char vocab, "
          f"{len(dm.splits['train']):,} train / {len(dm.splits['val']):,} val chars -> {run_dir}")
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    except BaseException:
        if logger and cfg.logger.kind == "wandb":
            import wandb

            wandb.finish(exit_code=1)  # else the next run in this process (a sweep's next job) logs into this one
        raise

    if trainer.global_rank != 0:
        return {}
    best_path = ckpt_cb.best_model_path or str(ckpt_dir / "last.ckpt")
    best = load_charlm(best_path)
    best_val = float(ckpt_cb.best_model_score) if ckpt_cb.best_model_score is not None else float("nan")
    final_val = float(trainer.callback_metrics.get("val/loss", float("nan")))
    steps_run = trainer.global_step - (resume["global_step"] if resume else 0)
    tokens = steps_run * cfg.data.batch_size * cfg.data.block_size
    results = {
        "model": model_name,
        "params": params,
        "val_loss": best_val,
        "val_bpc": best_val / math.log(2),
        "val_ppl": math.exp(min(best_val, 700.0)),
        "final_val_loss": final_val,
        "best_ckpt": str(Path(best_path).resolve()),
        "last_ckpt": str((ckpt_dir / "last.ckpt").resolve()),
        "steps": trainer.global_step,
        "tokens_per_s": tokens / clock.train_seconds if clock.train_seconds > 0 else float("nan"),
        "train_seconds": clock.train_seconds,
        "vocab_size": len(dm.vocab),
        "device": str(trainer.strategy.root_device),
        "precision": str(trainer.precision),
        "sampling": data_cfg["sampling"],  # stream: val is also evaluated with the state carried
    }
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = str(cfg.sample.prompt).replace("\\n", "\n")
    prompt = "".join(c for c in prompt if c in best.vocab.stoi)
    sample = prompt + generate(best.model, best.vocab, prompt, 300, cfg.sample.temperature, generator=g)[0]
    results["sample"] = sample
    tmp = run_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, run_dir / "results.json")
    if logger and cfg.logger.kind == "wandb":
        import wandb

        wandb.finish()
    print(f"\ncheckpoint: {results['best_ckpt']}")
    print(f"val loss {best_val:.4f} nats, {results['val_bpc']:.4f} bits/char (best of {trainer.global_step} steps; "
          f"final {final_val:.4f}), {results['tokens_per_s']:,.0f} train tokens/s")
    print(f"results:    {run_dir / 'results.json'}")
    print("sample:\n" + "-" * 40 + "\n" + sample + "\n" + "-" * 40)
    return results


def main() -> None:
    import hydra

    from charlm.errors import precheck_overrides

    sys.argv = [sys.argv[0]] + pick_trainer(sys.argv[1:])
    precheck_overrides("train", sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
    def _main(cfg: DictConfig) -> float | None:
        with report_user_errors():
            results = run(cfg)
        return results.get("val_loss") if results else None

    _main()


if __name__ == "__main__":
    # run through the importable module, so exception classes are the ones charlm.errors catches
    from charlm.train import main as _main

    _main()
