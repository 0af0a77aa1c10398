"""charlm's own Lightning callbacks, for what Lightning has no part for: the training clock, a final
validation at the last step, an interruption at a given step, and gate openings as metrics."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from charlm.atomic import write_json
from charlm.models.contract import capabilities
from charlm.training.gradients import gradient_flow, plot_flow


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class TrainClock(L.Callback):
    """Wall time spent training, without validation: tokens/s that is not diluted by evaluation."""

    def __init__(self):
        self.start = self.end = None
        self.val = 0.0
        self._v0 = 0.0

    def on_train_start(self, trainer, pl_module):
        self.start, self.val = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, pl_module):
        _sync()
        self._v0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        _sync()
        self.val += time.perf_counter() - self._v0

    def on_train_end(self, trainer, pl_module):
        _sync()
        self.end = time.perf_counter()

    @property
    def train_seconds(self) -> float | None:
        return (self.end - self.start - self.val) if self.start and self.end else None


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose best score survives a resume into another folder: the best
    checkpoint is copied along, so a worse first validation after the resume never becomes best.ckpt
    (Lightning's own forgets the score when the folder changes)."""

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key (its class and settings, fixed once built), built once: Lightning reads
        it for every hook it calls, several times a training step."""
        if "_state_key" not in self.__dict__:
            self.__dict__["_state_key"] = super().state_key
        return self.__dict__["_state_key"]

    def load_state_dict(self, state_dict: dict) -> None:
        old_dir, best = state_dict.get("dirpath"), state_dict.get("best_model_path")
        if self.dirpath and old_dir and Path(old_dir).resolve() != Path(self.dirpath).resolve() and best \
                and Path(best).is_file():
            new = Path(self.dirpath) / Path(best).name
            new.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(best, new)
            score = state_dict.get("best_model_score")
            state_dict = {**state_dict, "dirpath": self.dirpath, "best_model_path": str(new),
                          "kth_best_model_path": str(new), "best_k_models": {str(new): score}, "last_model_path": ""}
        super().load_state_dict(state_dict)


class ValidateAtEnd(L.Callback):
    """Ask Lightning to stop at `max_steps` itself, which makes it validate (and checkpoint) at that
    step even when it is not a multiple of `val_check_interval`: the last weights are always scored
    and saved, and a run shorter than one interval still validates."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class StopAt(L.Callback):
    """Stop training after the validation (and checkpoint) at `step`, as an interruption would."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class EveryNVal(L.Callback):
    """The base of callbacks that measure at every `every_n_val`-th validation on a fixed batch: the
    first `n_rows` rows of the first val batch, taken once and kept."""

    def __init__(self, every_n_val: int = 1, n_rows: int = 16):
        self.every_n_val, self.n_rows = max(1, int(every_n_val)), n_rows
        self._seen = 0
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def _due(self) -> bool:
        """Count this validation; True on the 1st, (1 + every_n_val)-th, ... ones."""
        self._seen += 1
        return (self._seen - 1) % self.every_n_val == 0

    def _val_rows(self, trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the fixed batch, (n_rows, T) each, on the CPU."""
        if self._rows is None:
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
            x, y, *_ = next(iter(loader))
            self._rows = (x[: self.n_rows].clone(), y[: self.n_rows].clone())  # (n, T) each
        return self._rows


class GateOpenings(EveryNVal):
    """At every `every_n_val`-th validation, log the model's memory-gate openings (`gates/...`, each in
    [0, 1]) on the first rows of the first val batch, through the contract's `gate_openings` hook.
    Models that do not declare the hook log nothing."""

    def __init__(self, every_n_val: int = 1, n_rows: int = 16):
        super().__init__(every_n_val, n_rows)
        self.history: list[dict] = []  # [{"step": s, name: value, ...}]

    def on_validation_end(self, trainer, pl_module) -> None:
        hook = capabilities(pl_module.model).gate_openings
        if hook is None or trainer.sanity_checking or not self._due():
            return
        idx = self._val_rows(trainer)[0]  # (n, T)
        with torch.inference_mode(False), torch.no_grad():
            gates = {k: float(v) for k, v in hook(idx.to(pl_module.device)).items()}
        self.history.append({"step": trainer.global_step, **gates})
        if trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics({f"gates/{k}": v for k, v in gates.items()}, step=trainer.global_step)


class GradFlowCallback(EveryNVal):
    """Every `every_n_val` validations, measure the gradient flow on a fixed val batch (the first
    `n_rows` rows of the first val batch), log the curve to W&B (if a WandbLogger is attached) and
    write RUN_DIR/gradflow/step_XXXXXX.json."""

    def __init__(self, every_n_val: int = 1, n_rows: int = 16):
        super().__init__(every_n_val, n_rows)
        self.curves: dict[int, list[float]] = {}  # step -> curve

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0 or not self._due():
            return
        x, y = (b.to(pl_module.device) for b in self._val_rows(trainer))
        step = trainer.global_step
        curve = gradient_flow(pl_module.model, x, y)
        self.curves[step] = curve
        out = Path(trainer.default_root_dir) / "gradflow"
        out.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "model": pl_module.hparams.get("model_name", "model"), "lag_norms": curve}
        write_json(out / f"step_{step:06d}.json", record)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                self._log_wandb(logger, step)

    def _log_wandb(self, logger, step: int) -> None:
        import matplotlib.pyplot as plt
        import wandb

        fig = plot_flow({f"step {s}": {"trained": c} for s, c in self.curves.items()},
                        title=f"Gradient flow (step {step})")
        logger.log_metrics({"gradflow/curve": wandb.Image(fig)}, step=step)
        plt.close(fig)
