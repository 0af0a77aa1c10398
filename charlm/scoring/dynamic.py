"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models"): the model keeps
learning from the text it has already scored, strictly score-then-update.

The split is read as ONE stream, cut into segments of `segment` characters with the yardstick's own batches
(`charlm.yardstick.eval_dataset` with one stream, or one sliding window at a time, stride = segment): a model
with unbounded context carries its state from segment to segment; a windowed model scores the `segment` new
characters of each window. Each segment is scored first (its nats are added to the total), then its mean loss
takes one gradient step. No character is seen by an update before it has been scored, and each is scored once.

Update per adapted parameter (theta0: the trained weights, g: the segment's gradient):

- rms (the paper's RMS dynamic evaluation): theta += -lr g / (rms + eps) + decay r (theta0 - theta), where
  rms is the root mean square of that parameter's gradients over a few training batches (estimated once,
  with the same segment length) and r = rms / mean(rms) over every adapted tensor, capped at 1 / decay so the
  decay never overshoots theta0 (as the reference code does);
- sgd: theta += -lr g + decay (theta0 - theta).

The weights are put back afterwards; nothing is written. Nothing here knows an architecture: the model
contract's usable context (`capabilities(model).context_size`) picks streams or windows.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from charlm.errors import ConfigError, DivergenceError
from charlm.yardstick import IGNORE, eval_dataset, protocol, score


@dataclass
class DynamicConfig:
    """`dynamic.*` of charlm.evaluate (conf/evaluate.yaml), also what charlm.compare's dynamic column uses."""

    enabled: bool = False              # `dynamic=true` on the command line sets this
    method: str = "rms"                # rms (Krause's RMS with decay) | sgd
    lr: Optional[float] = None         # >= 0; step size eta (null: the method's DEFAULT_LR)
    decay: float = 0.01                # >= 0; pull back toward the trained weights (lambda)
    eps: float = 2e-5                  # > 0; rms: added to the RMS before dividing
    segment: int = 50                  # characters scored per update
    params: Optional[List[str]] = None  # glob patterns on parameter names (null: every parameter)
    rms_batches: int = 20              # rms: training batches for the gradient statistics
    rms_batch_size: int = 16           # rms: streams (or windows) per such batch
    tune: bool = False                 # grid-search lr x decay on the first tune_chars val characters
    tune_chars: int = 20000
    tune_lr: Optional[List[float]] = None  # null: the method's TUNE_LR
    tune_decay: List[float] = field(default_factory=lambda: [0.0, 0.01, 0.03])


# Measured on tiny shakespeare val with a 300-step LSTM (docs/dynamic.md): rms steps are in units of the
# gradient's RMS, sgd steps in raw gradient units, so the two need lr values three orders of magnitude apart.
DEFAULT_LR = {"rms": 3e-4, "sgd": 0.1}
TUNE_LR = {"rms": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], "sgd": [0.01, 0.03, 0.1, 0.3, 1.0]}


def learning_rates(d) -> tuple[float, list[float]]:
    """The lr to use and the lr grid to tune over: the config's, or the method's defaults where null."""
    lr = DEFAULT_LR[d.method] if d.lr is None else float(d.lr)
    return lr, [float(v) for v in (TUNE_LR[d.method] if d.tune_lr is None else d.tune_lr)]


def check_dynamic(d, prefix: str = "dynamic.") -> None:
    """Ranges and choices of a DynamicConfig (types are OmegaConf's); one ConfigError naming the key."""
    rules = [("method", d.method in ("rms", "sgd"), "one of rms, sgd"),
             ("lr", d.lr is None or d.lr >= 0, ">= 0 (or null: the method's default)"),
             ("decay", d.decay >= 0, ">= 0"), ("eps", d.eps > 0, "> 0"), ("segment", d.segment >= 1, ">= 1"),
             ("rms_batches", d.rms_batches >= 1, ">= 1"), ("rms_batch_size", d.rms_batch_size >= 1, ">= 1"),
             ("tune_chars", d.tune_chars >= 2, ">= 2"),
             ("tune_lr", d.tune_lr is None or (len(d.tune_lr) > 0 and all(v >= 0 for v in d.tune_lr)),
              "a non-empty list of numbers >= 0 (or null: the method's grid)"),
             ("tune_decay", len(d.tune_decay) > 0 and all(v >= 0 for v in d.tune_decay),
              "a non-empty list of numbers >= 0")]
    for key, ok, expected in rules:
        value = d[key] if hasattr(d, "__getitem__") else getattr(d, key)
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            shown = list(value) if not isinstance(value, (int, float, str)) else value
            raise ConfigError(f"{prefix}{key}={shown}: must be {expected}")
    if d.params is not None and len(d.params) == 0:
        raise ConfigError(f"{prefix}params=[]: name at least one parameter pattern (null: every parameter)")


def adapted_params(model: nn.Module, patterns: list[str] | None) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs dynamic evaluation adapts: every one, or those whose dotted name matches a
    glob pattern (`head.*`, `*weight_hh*`). A pattern that matches nothing is a ConfigError naming it."""
    named = list(model.named_parameters())
    if patterns is None:
        return named
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n, _ in named):
            names = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
            raise ConfigError(f"dynamic.params: {p!r} matches no parameter (names: {names})")
    return [(n, t) for n, t in named if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def segments(ids: torch.Tensor, context: int | None, segment: int, streams: int = 1):
    """The yardstick's batches for `streams` streams (or windows per batch) advancing `segment` characters at a
    time: state-carried chunks for unbounded context, sliding windows of the context with stride `segment`."""
    if context is not None and segment > min(context, len(ids) - 1):
        raise ConfigError(f"dynamic.segment={segment}: longer than the window the model scores "
                          f"({min(context, len(ids) - 1)} characters): at most that many are new in a window")
    return eval_dataset(ids, context, streams, segment, segment, streams)


def _segment_loss(model: nn.Module, x, y, state):
    """Sum of nats over the scored targets, their count and the state to carry (detached: truncated BPTT)."""
    logits, state = model(x, state)                                           # (B, T, V)
    nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
    state = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, state)
    return nats, int((y != IGNORE).sum()), state


def _grad_context(device):
    """cuDNN's RNN kernels refuse a backward pass in eval mode; dynamic evaluation differentiates in eval mode
    (no dropout), so on CUDA the gradient passes run without cuDNN."""
    return torch.backends.cudnn.flags(enabled=False) if str(device).startswith("cuda") else torch.enable_grad()


def gradient_rms(model: nn.Module, batches, params: list[nn.Parameter], n_batches: int, device) -> list[torch.Tensor]:
    """Per-element root mean square of the gradient of each batch's mean loss over the first `n_batches`
    training batches (state carried as in evaluation). Elements no batch touched (an embedding row of a
    character absent from them) take their tensor's mean RMS, so a rare character cannot divide by eps alone."""
    sq = [torch.zeros_like(p) for p in params]
    state, done = None, 0
    with _grad_context(device), torch.enable_grad():
        for x, y, reset in batches:
            if done == n_batches:
                break
            model.zero_grad(set_to_none=True)
            nats, n, state = _segment_loss(model, x.to(device), y.to(device), None if reset else state)
            if n == 0:
                continue
            (nats / n).backward()
            for s, p in zip(sq, params):
                if p.grad is not None:
                    s.add_(p.grad.detach().float() ** 2)
            done += 1
    model.zero_grad(set_to_none=True)
    rms = [(s / max(done, 1)).sqrt() for s in sq]
    return [torch.where(r > 0, r, r.mean()) for r in rms]


class Updater:
    """One dynamic-evaluation step after each scored segment (the module docstring's update rule); `restore`
    puts the trained weights back."""

    def __init__(self, params: list[nn.Parameter], method: str, lr: float, decay: float, eps: float,
                 rms: list[torch.Tensor] | None):
        self.params, self.lr, self.decay = params, lr, decay
        self.theta0 = [p.detach().clone() for p in params]
        if method == "rms":
            self.scale = [1.0 / (r + eps) for r in rms]
            mean = sum(float(r.mean()) for r in rms) / len(rms)  # the reference's mean over tensors of mean RMS
            cap = 1.0 / decay if decay > 0 else math.inf
            self.rate = [(r / mean).clamp(max=cap) if mean > 0 else torch.ones_like(r) for r in rms]
        else:
            self.scale = self.rate = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        for p, p0, s, r in zip(self.params, self.theta0, self.scale, self.rate):
            if p.grad is not None:
                p.add_(p.grad * s if s is not None else p.grad, alpha=-self.lr)
            if self.decay:
                p.add_((p0 - p) * r if r is not None else p0 - p, alpha=self.decay)

    @torch.no_grad()
    def restore(self) -> None:
        for p, p0 in zip(self.params, self.theta0):
            p.copy_(p0)


def dynamic_pass(model: nn.Module, batches, updater: Updater, device) -> tuple[float, int]:
    """(sum of nats, characters scored) over the batches, each scored BEFORE the update that uses it."""
    total, count, state = 0.0, 0, None
    with _grad_context(device), torch.enable_grad():
        for x, y, reset in batches:
            model.zero_grad(set_to_none=True)
            nats, n, state = _segment_loss(model, x.to(device), y.to(device), None if reset else state)
            total, count = total + float(nats.detach()), count + n  # scored: these nats are final
            if n:
                (nats / n).backward()
                updater.step()
    model.zero_grad(set_to_none=True)
    return total, count


def run_dynamic(model: nn.Module, params: list[nn.Parameter], batches, method: str, lr: float, decay: float,
                eps: float, rms, device) -> tuple[float, int]:
    """One dynamic pass from the trained weights; the weights are put back afterwards."""
    updater = Updater(params, method, lr, decay, eps, rms)
    try:
        return dynamic_pass(model, batches, updater, device)
    finally:
        updater.restore()


def tune(model, params, batches, d, rms, device) -> tuple[float, float, list[dict]]:
    """(lr, decay) with the lowest dynamic loss on the tuning batches over the grid tune_lr x tune_decay,
    and every grid point's loss."""
    grid = []
    for lr in learning_rates(d)[1]:
        for decay in d.tune_decay:
            total, n = run_dynamic(model, params, batches, d.method, lr, decay, d.eps, rms, device)
            grid.append({"lr": float(lr), "decay": float(decay), "loss": total / n if math.isfinite(total) else None})
    finite = [g for g in grid if g["loss"] is not None]  # a diverged point (loss None) is never chosen
    if not finite:
        raise DivergenceError("dynamic.tune_lr: every grid point diverged (non-finite loss); try smaller values")
    best = min(finite, key=lambda g: g["loss"])
    return best["lr"], best["decay"], grid


def evaluate_dynamic(model: nn.Module, ids: torch.Tensor, d, train_ids: torch.Tensor | None = None,
                     tune_ids: torch.Tensor | None = None, seed: int = 1337, device="cpu") -> dict:
    """Static and dynamic figures of `model` on `ids` read as one stream (`segments`); `train_ids` feed the RMS
    statistics (method rms), `tune_ids` the grid search (d.tune). The model's weights are unchanged after."""
    from charlm.models.contract import capabilities

    context = capabilities(model).context_size
    if d.segment > len(ids) - 1:
        raise ConfigError(f"dynamic.segment={d.segment}: longer than the split ({len(ids) - 1:,} characters to score)")
    batches = segments(ids, context, d.segment)
    was_training = model.training
    model.eval()
    named = adapted_params(model, None if d.params is None else list(d.params))
    params = [p for _, p in named]
    frozen = [p for p in model.parameters() if all(p is not q for q in params) and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # no gradient for what is not adapted
    try:
        rms = None
        if d.method == "rms":
            rms = gradient_rms(model, rms_batches(train_ids, context, d, seed), params, d.rms_batches, device)
        lr, decay, grid = learning_rates(d)[0], float(d.decay), None
        if d.tune:
            if tune_ids is None or d.segment > len(tune_ids) - 1:
                raise ConfigError(f"dynamic.tune=true: the tuning text is shorter than dynamic.segment={d.segment}")
            lr, decay, grid = tune(model, params, segments(tune_ids, context, d.segment), d, rms, device)
        static_total, static_n = score(model, batches, device)
        total, n = run_dynamic(model, params, batches, d.method, lr, decay, d.eps, rms, device)
        if not math.isfinite(total):
            raise DivergenceError(f"dynamic.lr={lr:g}: dynamic evaluation diverged (non-finite loss); lower "
                                  "dynamic.lr or raise dynamic.decay")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    assert n == static_n, "dynamic and static passes scored different characters"
    base = protocol(context if context is None else min(context, len(ids) - 1), 1, d.segment, d.segment, n)
    how = ("one stream, state carried, segments of" if context is None
           else f"one stream, sliding window {base['window']}, stride")
    settings = {"method": d.method, "lr": lr, "decay": decay, "eps": float(d.eps), "segment": int(d.segment),
                "params": None if d.params is None else list(d.params), "adapted_tensors": len(params),
                "adapted_weights": sum(p.numel() for p in params), "seed": seed}
    if d.method == "rms":
        settings.update(rms_batches=int(d.rms_batches), rms_batch_size=int(d.rms_batch_size))
    out = {"dynamic_loss": total / n, "dynamic_bpc": total / n / math.log(2),
           "static_loss": static_total / static_n, "static_bpc": static_total / static_n / math.log(2),
           "chars_scored": n, "settings": settings,
           "protocol": dict(base, text=f"{how} {d.segment} chars: each scored, then one update on it; "
                                        f"{n:,} chars scored once")}
    if grid is not None:
        out["tuning"] = {"chars": len(tune_ids) - 1, "grid": grid}
    return out


def rms_batches(train_ids: torch.Tensor | None, context: int | None, d, seed: int):
    """The training batches of the gradient statistics: `rms_batch_size` streams (or windows) advancing
    `segment` characters, over a stretch of the training text starting at a seeded random offset."""
    need = d.rms_batch_size * d.rms_batches * d.segment + (context or 0) + 1
    if train_ids is None or len(train_ids) < d.segment + 2:
        n = 0 if train_ids is None else len(train_ids)
        raise ConfigError(f"dynamic.method=rms needs training text for its gradient statistics; the train split "
                          f"has {n} characters (dynamic.method=sgd needs none)")
    need = min(need, len(train_ids))
    start = int(torch.randint(len(train_ids) - need + 1, (1,), generator=torch.Generator().manual_seed(seed)))
    stretch = train_ids[start : start + need]
    return segments(stretch, None if context is None else min(context, len(stretch) - 1), d.segment,
                    d.rms_batch_size)
