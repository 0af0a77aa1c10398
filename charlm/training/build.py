"""The builder: one road from a composed config to objects. Every entry point that trains or rebuilds
a model (train, compare, report, gradflow, sweep, the benchmark) goes through here.

    cfg --build_data-->  CharDataModule (sampling and evaluation as the model declares)
        --build_module-> CharLM (the model from cfg.model, the loss, clipping, optimizer, schedule)
        --build_trainer> lightning.Trainer (loggers, callbacks, precision from the config groups)

A parameter walks in at most three files: `conf/model/lstm.yaml` (hidden_dim: 256) -> this module
(`build_module` hands cfg.model to CharLM, whose `charlm.models.contract.build_model` runs Hydra's `instantiate`)
-> `charlm/models/rnn.py` (`RNNLM(hidden_dim=...)`).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from charlm.atomic import atomic_path
from charlm.checkpoint import read_checkpoint
from charlm.data.datamodule import CharDataModule
from charlm.data.vocab import CharVocab
from charlm.errors import ConfigError
from charlm.models.contract import Capabilities, capabilities
from charlm.training.budget import BudgetBar, BudgetClock, apply_tokens, spread_evals, trainer_overrides
from charlm.training.callbacks import GateOpenings, GradFlowCallback, StopAt, TrainClock, ValidateAtEnd
from charlm.training.fastpath import QuietProfiler, unset_idle_hooks
from charlm.training.module import CharLM

# Lightning 2.6's pytree helper (lightning/pytorch/utilities/_pytree.py) builds torch's LeafSpec, which
# torch 2.10+ marks deprecated: one line in every run's log that no charlm user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
# CharLM sums validation's figures over every rank before it logs them (on_validation_epoch_end), so
# Lightning's advice under DDP to sync them again (`sync_dist=True`, once per figure) does not apply.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('val/")
# Lightning 2.6 advertises its cloud logger (litlogger) at the start of every run and every DDP rank's start.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in
                                                                     record.getMessage())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file, fsynced, then renamed: a crash never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_checkpoint(path, map_location=map_location or "cpu")


def plain(node) -> dict:
    """A config node as plain resolved data (what CharLM stores in its checkpoint)."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def model_class_capabilities(cfg: DictConfig) -> Capabilities:
    """What the configured model class declares (before it is built)."""
    try:
        return capabilities(get_class(cfg.model._target_))
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"model._target_={cfg.model._target_}: no such class") from None


def resolve_sampling(cfg: DictConfig, caps: Capabilities) -> str:
    """data.sampling, with `auto` replaced by what the model prefers."""
    sampling = cfg.data.get("sampling", "auto")
    return caps.preferred_sampling if sampling == "auto" else sampling


def build_data(cfg: DictConfig, vocab: CharVocab | None = None, caps: Capabilities | None = None) -> CharDataModule:
    """The data module the config names, prepared (corpus read, encoded, split, checked)."""
    caps = caps or model_class_capabilities(cfg)
    data_cfg = plain(cfg.data)
    data_cfg["sampling"] = resolve_sampling(cfg, caps)
    data_cls = get_class(data_cfg.pop("_target_", "charlm.data.datamodule.CharDataModule"))
    dm = data_cls(vocab=vocab, seed=cfg.seed, **data_cfg)
    dm.prepare()
    return dm


def configure_eval(cfg: DictConfig, dm: CharDataModule, model) -> Capabilities:
    """Point the data module's val/test passes at the yardstick the built model needs."""
    caps = capabilities(model)
    dm.configure_eval(context_size=caps.context_size, **plain(cfg.eval))
    return caps


def build_module(cfg: DictConfig, vocab: CharVocab, sampling: str, model_name: str) -> CharLM:
    """The LightningModule around the configured model; `compile: true` wraps the model in torch.compile."""
    module = CharLM(
        model=plain(cfg.model),
        vocab=vocab.to_dict(),
        model_name=model_name,
        optim=plain(cfg.optim),
        scheduler=plain(cfg.scheduler) if cfg.get("scheduler") else None,
        clip=plain(cfg.clip),
        carry_state=sampling == "stream",
        sample=plain(cfg.sample),
        divergence_factor=cfg.divergence_factor,
        state_reset=cfg.get("state_reset", 0.0),
    )
    if cfg.get("compile"):
        module.model = torch.compile(module.model)
    return module


def build_loggers(cfg: DictConfig, run_dir: Path, resume_wandb_id: str | None = None) -> list:
    """The loggers of the `logger` group (WandbLogger offline unless WANDB_MODE says otherwise, CSVLogger)."""
    loggers = []
    for entry in (cfg.get("logger") or {}).values():
        if entry is None:
            continue
        kwargs = {}
        target = str(entry._target_)
        if target.endswith("WandbLogger"):
            mode = os.environ.get("WANDB_MODE") or ("offline" if entry.get("offline", True) else "online")
            os.environ["WANDB_MODE"] = mode
            kwargs = {"offline": mode == "offline", "save_dir": str(run_dir)}
            if resume_wandb_id and not entry.get("id"):
                kwargs["id"] = resume_wandb_id  # the resumed run continues the same W&B run
        elif "save_dir" in entry:
            kwargs = {"save_dir": str(run_dir)}
        logger = instantiate(entry, **kwargs, _convert_="all")
        if target.endswith("WandbLogger"):
            # Lightning's WandbLogger always passes `anonymous` to wandb.init, which W&B answers with "The
            # anonymous setting has no effect" on every run; the setting is gone, so it is not passed at all
            getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(logger)
    return loggers


def build_callbacks(cfg: DictConfig, run_dir: Path, dm: CharDataModule, loggers: list,
                    clock: BudgetClock) -> list[L.Callback]:
    """The `callbacks` group (ModelCheckpoint into RUN_DIR/checkpoints, LR monitor, progress bar,
    early stopping when chosen), then charlm's own: final validation, the run's clock, gates, data-task
    metrics. The progress bar is handed the clock."""
    callbacks = []
    for entry in (cfg.get("callbacks") or {}).values():
        if entry is None:
            continue
        target = str(entry._target_)
        if target.endswith("LearningRateMonitor") and not loggers:
            continue  # it needs a logger
        kwargs = {"dirpath": str(run_dir / "checkpoints")} if target.endswith(("ModelCheckpoint", "BestCheckpoint")) \
            else {}
        callback = instantiate(entry, **kwargs, _convert_="all")
        if isinstance(callback, BudgetBar):
            callback.clock = clock
        callbacks.append(callback)
    callbacks += [ValidateAtEnd(), TrainClock(), clock, *dm.callbacks()]
    if cfg.get("gates_every"):
        callbacks.append(GateOpenings(every_n_val=int(cfg.gates_every)))
    if cfg.get("gradflow_every"):  # the gradient-flow curve every N validations (W&B plot + RUN_DIR/gradflow/)
        callbacks.append(GradFlowCallback(every_n_val=int(cfg.gradflow_every)))
    if cfg.get("stop_at_step"):
        callbacks.append(StopAt(int(cfg.stop_at_step)))
    return callbacks


def resolve_precision(trainer_cfg: dict, caps: Capabilities) -> str:
    """`precision: auto` becomes what the model's kernels want on a GPU, and 32-true elsewhere."""
    if str(trainer_cfg.get("precision")) != "auto":
        return trainer_cfg["precision"]
    on_gpu = trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return caps.gpu_precision if on_gpu else "32-true"


def build_trainer(cfg: DictConfig, run_dir: Path, caps: Capabilities, loggers: list, callbacks: list) -> L.Trainer:
    """A Lightning Trainer as the `trainer` group says, writing into `run_dir`."""
    trainer_cfg = plain(cfg.trainer) | trainer_overrides(cfg)  # a seconds budget: Lightning's max_time
    trainer_cfg["precision"] = resolve_precision(trainer_cfg, caps)
    trainer_cfg = {k: v for k, v in trainer_cfg.items() if v is not None or k in ("check_val_every_n_epoch",)}
    if isinstance(trainer_cfg.get("val_check_interval"), int) and trainer_cfg.get("max_steps", 0) > 0:
        trainer_cfg["val_check_interval"] = min(trainer_cfg["val_check_interval"], trainer_cfg["max_steps"])
    trainer_cfg.setdefault("profiler", QuietProfiler())
    trainer = L.Trainer(
        **trainer_cfg,
        logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir), enable_checkpointing=True,
        use_distributed_sampler=False,  # val batches are sharded by rank in CharDataModule (no padded repeats)
    )
    unset_idle_hooks(trainer.callbacks)
    apply_tokens(trainer, cfg)  # a tokens budget needs the world size: steps set on the built trainer
    return trainer


@dataclass
class Built:
    """Everything a training run needs, built from one config."""

    dm: CharDataModule
    module: CharLM
    trainer: L.Trainer
    caps: Capabilities
    model_name: str
    params: int
    loggers: list = field(default_factory=list)
    clock: BudgetClock | None = None  # the run's one clock, also handed to the module and the progress bar

    def callback(self, cls: type):
        """The trainer's callback of this type (None if absent)."""
        return next((c for c in self.trainer.callbacks if isinstance(c, cls)), None)


def build(cfg: DictConfig, run_dir: Path, model_name: str, vocab: CharVocab | None = None,
          resume_wandb_id: str | None = None, extra_callbacks=()) -> Built:
    """Data, module and trainer for `cfg`, writing into `run_dir`. `vocab`: a resumed checkpoint's."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    dm = build_data(cfg, vocab, model_class_capabilities(cfg))
    module = build_module(cfg, dm.vocab, dm.sampling, model_name)
    caps = configure_eval(cfg, dm, module.model)
    params = sum(p.numel() for p in module.model.parameters())
    loggers = build_loggers(cfg, run_dir, resume_wandb_id)
    clock = BudgetClock((cfg.get("budget") or {}).get("seconds"), spread_evals(cfg))
    module.budget_clock = clock  # the schedule's progress
    callbacks = build_callbacks(cfg, run_dir, dm, loggers, clock) + list(extra_callbacks)
    trainer = build_trainer(cfg, run_dir, caps, loggers, callbacks)
    for logger in loggers:
        logger.log_hyperparams(plain(cfg) | {"params": params})
    return Built(dm, module, trainer, caps, model_name, params, loggers, clock)
