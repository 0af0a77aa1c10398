"""Learning-rate schedules, built from torch's own schedulers (`scheduler._target_` in conf/scheduler/)."""

from __future__ import annotations

from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, SequentialLR


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1):
    """Linear warmup then cosine decay to `min_lr_ratio * lr`, from torch's own schedulers."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    base_lr = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=base_lr * min_lr_ratio)
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def one_cycle(optimizer, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4, anneal_strategy: str = "cos"):
    """torch's OneCycleLR peaking at the optimizer's lr (Smith & Topin's super-convergence schedule)."""
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(2, total_steps), pct_start=pct_start,
                      div_factor=div_factor, final_div_factor=final_div_factor, anneal_strategy=anneal_strategy)
