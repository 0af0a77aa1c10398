"""Learning-rate schedules as functions of progress p in [0, 1] (`scheduler._target_` in conf/scheduler/).

Progress is the fraction of the run's budget spent, read from one clock (`charlm.training.budget.BudgetClock`):
step / max_steps in a step run (a tokens budget is a step run), Lightning's Timer elapsed / seconds under
`budget.seconds`. So the same schedule anneals to its floor at the end of any budget, and the LR reaches
the floor exactly when the run stops.

Warmup is declared once, in optimizer steps (`warmup_steps`), with the same meaning under every budget:
the LR factor is multiplied by min(1, max((step + 1) / warmup_steps, p / WARMUP_SHARE)). Adam's moments
need steps, not seconds, to settle; but a run too short for its warmup still reaches the peak LR once
WARMUP_SHARE (10%) of its budget is spent (a 12-step run warms up over its first step or two, not over
100 steps it never takes). The decay runs on progress from p = 0; with warmup a few percent of the run,
the two overlap harmlessly.

Extension: resuming a run with a longer horizon (more steps, seconds or tokens than it was started with)
continues from the LR where it was and decays it to the floor at the new end (cosine-shaped): the LR never
rises again. A run that had finished continues at its floor. An interrupted run resumed on the same
horizon is not an extension and stays bit-identical to the straight run.

Each schedule is a torch `LambdaLR` whose factor reads progress: the optimizer and Lightning's scheduler
handling (checkpointing `last_epoch`, LearningRateMonitor) stay torch's and Lightning's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR

WARMUP_SHARE = 0.1  # warmup ends by this share of the budget, however many warmup_steps were asked for


def _cos(t: float) -> float:
    """1 at t = 0 down to 0 at t = 1, cosine-shaped."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


@dataclass(frozen=True)
class Extension:
    """Where a run was extended: progress on the new horizon, and the LR factor it had there."""

    at: float
    factor: float


class ProgressSchedule:
    """factor(step, p) = warmup(step) * shape(p), with the extension rule; `floor` is the factor at p = 1."""

    def __init__(self, shape: Callable[[float], float], floor: float, warmup_steps: int = 0):
        self.shape, self.floor, self.warmup_steps = shape, floor, max(0, int(warmup_steps))
        self.extension: Extension | None = None

    def decay(self, p: float) -> float:
        """The factor at progress p, without warmup (the extension's decay once it began)."""
        e = self.extension
        if e is None or p < e.at:
            return self.shape(p)
        span = 1.0 - e.at
        return self.floor + (e.factor - self.floor) * (_cos((p - e.at) / span) if span > 0 else 0.0)

    def factor(self, step: int, p: float) -> float:
        warm = min(1.0, max((step + 1) / self.warmup_steps, p / WARMUP_SHARE)) if self.warmup_steps else 1.0
        return warm * self.decay(p)

    def extend(self, old_progress: float, new_progress: float) -> None:
        """The run resumes on a new horizon: from the factor it had (at `old_progress` on the old horizon)
        decay to the floor at the new end, never above where it was."""
        current = self.decay(min(old_progress, 1.0))
        self.extension = Extension(at=min(max(new_progress, 0.0), 1.0), factor=current)

    def lambda_lr(self, optimizer, progress: Callable[[], float]) -> ProgressLR:
        """A torch LambdaLR reading progress at every step."""
        return ProgressLR(optimizer, self, progress)


class ProgressLR(LambdaLR):
    """torch's LambdaLR with the factor of a `ProgressSchedule` at the current progress. Its checkpointed
    state is LambdaLR's own (step count, base and last LRs); the schedule itself comes from the config."""

    def __init__(self, optimizer, schedule: ProgressSchedule, progress: Callable[[], float]):
        self.progress_schedule = schedule
        super().__init__(optimizer, lambda step: schedule.factor(step, progress()))

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "progress_schedule"}


def warmup_cosine(warmup_steps: int = 100, min_lr_ratio: float = 0.1) -> ProgressSchedule:
    """Linear warmup over `warmup_steps`, cosine decay over the run to `min_lr_ratio * lr` at its end."""
    return ProgressSchedule(lambda p: min_lr_ratio + (1 - min_lr_ratio) * _cos(p), min_lr_ratio, warmup_steps)


def one_cycle(pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4,
              anneal_strategy: str = "cos") -> ProgressSchedule:
    """Smith & Topin's one cycle on progress (torch OneCycleLR's shape): from lr/div_factor up to lr over
    `pct_start` of the run, then down to lr/(div_factor*final_div_factor) at its end."""
    start, floor = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)

    def ramp(t: float) -> float:  # 1 -> 0 over t in [0, 1]
        return _cos(t) if anneal_strategy == "cos" else 1.0 - min(max(t, 0.0), 1.0)

    def shape(p: float) -> float:
        if p < pct_start:
            return 1.0 + (start - 1.0) * ramp(p / pct_start)
        return floor + (1.0 - floor) * ramp((p - pct_start) / (1.0 - pct_start))

    return ProgressSchedule(shape, floor)


def constant(warmup_steps: int = 0) -> ProgressSchedule:
    """The optimizer's lr throughout (after an optional warmup)."""
    return ProgressSchedule(lambda p: 1.0, 1.0, warmup_steps)
