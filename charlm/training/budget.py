"""Budgets: a run bounded by steps (the default, reproducible anywhere), tokens or wall seconds.

- `trainer.max_steps=N`: progress p = step / N.
- `budget.tokens=N`: a step run of ceil(N / (batch_size * block_size * world_size * accumulate_grad_batches))
  steps.
- `budget.seconds=N` (N may have a fraction): Lightning's own Timer (`trainer.max_time`): wall time from the
  start of training, validations included, saved in the checkpoint, so a resumed run continues the clock and
  ends at the same total. p = elapsed / N. Start-up and the final exact evaluation happen outside the budget.

One clock (`BudgetClock`) gives the schedule its progress and stops the run, so the LR reaches its floor
exactly when the run ends. Under a budget it also decides when to validate: `budget.evals` validations
spread evenly over the budget, exactly that many, the last at its end. Under DDP every decision is rank 0's:
rank 0's elapsed seconds are broadcast once per step, so every rank applies the same LR, validates at the
same steps and stops at the same step. The progress bar (`BudgetBar`) counts the budget: seconds, or steps.
"""

from __future__ import annotations

from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer, TQDMProgressBar

from charlm.errors import ConfigError

DEFAULT_EVALS = 6  # validations a budget spreads when budget.evals is null
MIN_SECONDS = 10  # below this, start-up and the first validation dominate: not a budget worth training


def tokens_per_step(batch_size: int, block_size: int, world_size: int = 1, accumulate: int = 1) -> int:
    return batch_size * block_size * world_size * accumulate


def steps_for_tokens(tokens: int, per_step: int) -> int:
    """ceil(tokens / tokens per step)."""
    return -(-int(tokens) // per_step)


def check_budget(cfg, one_kind: bool = False) -> None:
    """Refuse an impossible budget in one line: both kinds (or, with `one_kind`, not exactly one), seconds
    under MIN_SECONDS, tokens under one step (under 1 when `cfg` has no `data`: compare, whose models each
    check their own step later), evals under 1."""
    b = cfg.get("budget")
    if not b:
        return
    if one_kind and (b.get("seconds") is None) == (b.get("tokens") is None):
        raise ConfigError("give exactly one budget: budget.seconds=S (wall seconds per run) or budget.tokens=N")
    if b.get("seconds") is not None and b.get("tokens") is not None:
        raise ConfigError("budget: give budget.seconds or budget.tokens, not both")
    if b.get("seconds") is not None and b.seconds < MIN_SECONDS:
        raise ConfigError(f"budget.seconds={b.seconds:g}: must be >= {MIN_SECONDS} (start-up and the first "
                          "validation alone take seconds)")
    if b.get("tokens") is not None and cfg.get("data") is None and b.tokens < 1:
        raise ConfigError(f"budget.tokens={b.tokens}: must be >= 1")
    if b.get("tokens") is not None and cfg.get("data") is not None:
        per = tokens_per_step(cfg.data.batch_size, cfg.data.block_size, 1,
                              cfg.trainer.get("accumulate_grad_batches", 1))
        if b.tokens < per:
            raise ConfigError(f"budget.tokens={b.tokens}: less than one step ({per:,} tokens = data.batch_size "
                              f"{cfg.data.batch_size} x data.block_size {cfg.data.block_size} x accumulation)")
    if b.get("evals") is not None and b.evals < 1:
        raise ConfigError(f"budget.evals={b.evals}: must be >= 1")


def trainer_overrides(cfg) -> dict:
    """The Lightning Trainer arguments a seconds budget sets (a tokens budget is set after the trainer
    exists, when its world size is known: `apply_tokens`)."""
    b = cfg.get("budget") or {}
    if b.get("seconds") is None:
        return {}
    # the clock decides when to validate (BudgetClock); Lightning's time mode keeps
    evals = b.get("evals") or DEFAULT_EVALS
    return {"max_time": timedelta(seconds=float(b.seconds)), "max_steps": -1,  # checkpoints for validation ends
            "val_check_interval": timedelta(seconds=float(b.seconds) / evals)}


def apply_tokens(trainer: L.Trainer, cfg) -> None:
    """A tokens budget as a number of steps, now that the world size is known; validations spread evenly."""
    b = cfg.get("budget") or {}
    if b.get("tokens") is not None:
        per = tokens_per_step(cfg.data.batch_size, cfg.data.block_size, trainer.world_size,
                              trainer.accumulate_grad_batches)
        trainer.fit_loop.epoch_loop.max_steps = steps_for_tokens(b.tokens, per)
    if b.get("seconds") is None and (b.get("tokens") is not None or b.get("evals") is not None):
        # the steps are the clock's to pick (BudgetClock); Lightning's interval is moot
        evals = b.get("evals") or DEFAULT_EVALS
        trainer.val_check_interval = max(1, trainer.max_steps // evals)


def spread_evals(cfg) -> int | None:
    """The validations a budget spreads (budget.evals, 6 by default) under `budget.seconds`, `budget.tokens` or
    `budget.evals`; None for a plain step run (Lightning's `val_check_interval`)."""
    b = cfg.get("budget") or {}
    if b.get("seconds") is None and b.get("tokens") is None and b.get("evals") is None:
        return None
    return int(b.get("evals") or DEFAULT_EVALS)


class BudgetClock(L.Callback):
    """The one clock: progress in [0, 1] for the schedule, the stop under a seconds budget, and, under a
    budget (`evals`), the steps that validate.

    Under a seconds budget, progress and the stop read `shared_elapsed`: rank 0's Timer, broadcast to every
    rank once per step (one float; nothing is sent in a one-process run). Each rank's own timer would let
    the ranks apply different LRs, and stop or validate at different steps, which hangs on a collective.

    Validations fall where progress crosses k / evals (k = 1 .. evals - 1), and the last when the run stops
    at its end (Lightning validates at a stop): exactly `evals` (at most one a step). Lightning asks "validate
    after this step?" in one place (the epoch loop's `_should_check_val_fx`); the clock answers it, from the
    same shared figures on every rank.

    Its state (the horizon the run was started with, and the progress reached) is saved in the checkpoint;
    a resume on a longer horizon is an extension (charlm.training.schedule): the LR decays from where it was.
    """

    def __init__(self, seconds: float | None = None, evals: int | None = None):
        self.seconds = None if seconds is None else float(seconds)
        self.evals = evals
        self.trainer: L.Trainer | None = None
        self.done = False
        self.shared_elapsed = 0.0  # rank 0's training seconds at the last step's end (every rank)
        self._next = 1  # the next validation: where progress reaches _next / evals
        self._due = False
        self._loaded: dict | None = None

    # ---- progress ----------------------------------------------------------------------
    def _timer(self) -> Timer | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None) if self.trainer else None

    def elapsed(self) -> float:
        """This process's Timer: training seconds, validations included (the bar, results.json)."""
        timer = self._timer()
        return timer.time_elapsed("train") if timer is not None else 0.0

    def horizon(self) -> dict:
        return {"seconds": self.seconds} if self.seconds is not None else {"steps": self.trainer.max_steps}

    def progress(self) -> float:
        if self.done:
            return 1.0
        if self.trainer is None:
            return 0.0
        if self.seconds is not None:
            return min(1.0, self.shared_elapsed / self.seconds)
        max_steps = self.trainer.max_steps
        return min(1.0, self.trainer.global_step / max_steps) if max_steps and max_steps > 0 else 0.0

    def _share(self, trainer) -> None:
        """shared_elapsed = rank 0's elapsed seconds, on every rank."""
        elapsed = self.elapsed()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([elapsed], dtype=torch.float64, device=trainer.strategy.root_device)
            torch.distributed.broadcast(t, src=0)
            elapsed = float(t.item())
        self.shared_elapsed = elapsed

    def _crossed(self) -> int:
        """How many of the evals points progress has reached (exactly, in steps, for a step budget)."""
        if self.seconds is not None:
            return int(self.shared_elapsed * self.evals / self.seconds)
        max_steps = self.trainer.max_steps
        return self.trainer.global_step * self.evals // max_steps if max_steps > 0 else 0

    def _validate_now(self, lightning_decides):
        """The epoch loop's question, answered by the clock: at a stop, Lightning's own answer (it validates
        the last weights); otherwise whether progress has just crossed the next validation point."""
        def validate_now(data_fetcher) -> bool:
            return lightning_decides(data_fetcher) if self.trainer.should_stop else self._due
        return validate_now

    # ---- Lightning hooks ---------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer

    def on_train_start(self, trainer, pl_module) -> None:
        if self.seconds is not None:
            self._share(trainer)  # a resumed run starts from its saved clock, on every rank alike
        if self.evals:
            loop = trainer.fit_loop.epoch_loop
            loop._should_check_val_fx = self._validate_now(type(loop)._should_check_val_fx.__get__(loop))
            self._next = self._crossed() + 1

    def teardown(self, trainer, pl_module, stage: str) -> None:
        vars(trainer.fit_loop.epoch_loop).pop("_should_check_val_fx", None)  # Lightning's own again

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        return {"horizon": self.horizon(), "progress": self.progress()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = dict(state_dict) if state_dict else None

    def resumed_progress(self) -> tuple[float, float] | None:
        """On a resume with another horizon: (progress on the old horizon, progress on the new), else None."""
        saved = self._loaded
        if not saved or saved.get("horizon") == self.horizon():
            return None
        old = float(saved.get("progress", 0.0))
        old_h, new_h = saved["horizon"], self.horizon()
        if "steps" in old_h and "steps" in new_h and new_h["steps"] > 0:
            new = old * old_h["steps"] / new_h["steps"]
        elif "seconds" in old_h and "seconds" in new_h:
            new = old * old_h["seconds"] / new_h["seconds"]
        else:  # a step run resumed under a seconds budget or the other way round: start the decay here
            new = 0.0
        return old, new

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.seconds is not None:
            self._share(trainer)  # read by the next step's LR, and by the decisions below
            if self.shared_elapsed >= self.seconds:
                trainer.should_stop = True
                self._finish(trainer)
        if self.evals:
            crossed = self._crossed()
            self._due = self._next <= crossed and self._next < self.evals
            if self._due:
                self._next = crossed + 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self.seconds is not None and trainer.should_stop or trainer.max_steps > 0 and \
                trainer.global_step >= trainer.max_steps:
            self._finish(trainer)

    def _finish(self, trainer) -> None:
        """The budget is spent: progress is 1, and the optimizer's LR is the schedule's floor."""
        self.done = True
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            schedule = getattr(sched, "progress_schedule", None)  # charlm.training.schedule.ProgressLR
            if schedule is None:
                continue
            lrs = [base * schedule.factor(sched.last_epoch, 1.0) for base in sched.base_lrs]
            for group, lr in zip(sched.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs


class BudgetBar(TQDMProgressBar):
    """Lightning's progress bar, counting the budget: seconds under `budget.seconds` (elapsed/total s and a
    true ETA), steps otherwise (continuing from a resumed step). Never a placeholder step limit."""

    clock: BudgetClock | None = None  # the run's clock, handed over by charlm.training.build (None: count steps)

    def get_metrics(self, trainer, pl_module) -> dict:
        """Lightning's bar metrics, led by the training loss at the last logging step (CharLM.train_loss)."""
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "train_loss", None)
        return metrics if loss is None else {"loss": loss, **metrics}

    def _position(self, trainer) -> tuple[float | None, float]:
        """(total, done) of the budget, in seconds or steps."""
        clock = self.clock
        if clock is not None and clock.seconds is not None:
            return float(clock.seconds), round(min(clock.elapsed(), clock.seconds), 1)
        return (trainer.max_steps if trainer.max_steps > 0 else None), trainer.global_step

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        total, done = self._position(trainer)
        bar = self.train_progress_bar
        bar.total, bar.n = total, done
        clock = self.clock
        if clock is not None and clock.seconds is not None:
            bar.unit = "s"
            bar.set_description("budget")
            bar.bar_format = "{desc}{percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        step = trainer.global_step
        _, bar.n = self._position(trainer)  # always current; drawn every refresh_rate steps and at the end
        if self._should_update(step, -1) or trainer.should_stop:
            bar.set_postfix({"step": step, **self.get_metrics(trainer, pl_module)})
            bar.refresh()


def final_lr(trainer: L.Trainer) -> float | None:
    """The first param group's LR when the run ended."""
    opts = trainer.optimizers
    return float(opts[0].param_groups[0]["lr"]) if opts else None


def budget_record(cfg, trainer: L.Trainer) -> dict:
    """What results.json records of the budget: its kind and size, the steps it allowed, evals."""
    b = cfg.get("budget") or {}
    kind = "seconds" if b.get("seconds") is not None else "tokens" if b.get("tokens") is not None else "steps"
    out = {"kind": kind, "seconds": b.get("seconds"), "tokens": b.get("tokens"), "evals": b.get("evals")}
    out["max_steps"] = trainer.max_steps if trainer.max_steps > 0 else None
    return out


