"""The yardstick: every character of a split scored exactly once, left to right, with all the context
the model can use. One figure for every model, so any two runs compare.

- A model with unbounded context (every recurrent model, `context_size = None`) is scored as
  `streams` contiguous streams with the state carried across chunks (`EvalStreams`). The number of
  streams is fixed by `eval.streams`, not by the training batch size; each stream starts cold once.
- A model with a window (`context_size = W`, the transformer) is scored by a sliding window of W
  characters moved by `stride`: each window scores only what the previous one did not
  (`SlidingWindows`), so every character but the first W has at least W - stride of context.

Both yield `Batch(x, y, reset)` whose targets are IGNORE where a position is padding or was already
scored, so the loss is `cross_entropy(..., ignore_index=IGNORE, reduction="sum")` over the scored
targets, divided by their count. Nothing here knows an architecture; `protocol()` names the figure.

A second figure, `window_loss`, matches nanoGPT's printed val loss: the mean loss over random
windows of 256 characters (or the model's context when smaller), every position from an empty state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IGNORE = -100  # targets that are not scored (padding, or context already scored by an earlier window)


class Batch(NamedTuple):
    """x, y: (B, T) ids; reset: the carried state must be dropped before this batch (a Python bool)."""

    x: torch.Tensor
    y: torch.Tensor
    reset: bool = True


class EvalStreams(Dataset):
    """The split's n-1 targets cut into `streams` contiguous streams of ceil((n-1)/streams) targets,
    served chunk after chunk (`block_size` characters per chunk). The last stream is padded with
    IGNORE targets at its end, which no scored position can see. Item i: Batch(x, y, reset=i == 0).
    `rank`/`world` take every world-th stream starting at rank (DDP: each rank its own share).
    Each chunk is read from `ids` when asked for (a memory map stays a map: nothing is copied whole)."""

    def __init__(self, ids: torch.Tensor, block_size: int, streams: int, rank: int = 0, world: int = 1):
        n_targets = len(ids) - 1
        self.ids = ids
        self.streams = max(1, min(streams, n_targets))
        self.stream_len = -(-n_targets // self.streams)  # ceil
        self.block_size = block_size
        self.n = -(-self.stream_len // block_size)
        self.rows = torch.arange(rank, max(rank, self.streams), world)  # none when rank >= streams
        self.targets = int((n_targets - self.rows * self.stream_len).clamp(0, self.stream_len).sum())  # scored here

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < self.n:
            raise IndexError(i)
        a, b = i * self.block_size, min((i + 1) * self.block_size, self.stream_len)
        pos = self.rows[:, None] * self.stream_len + torch.arange(a, b + 1)          # (S, t+1) positions
        valid = pos < len(self.ids)
        w = torch.where(valid, self.ids[pos.clamp(max=len(self.ids) - 1)].long(), 0)  # (S, t+1)
        y = w[:, 1:].masked_fill(~valid[:, 1:], IGNORE)                             # (S, t)
        return Batch(w[:, :-1], y, i == 0)


class SlidingWindows(Dataset):
    """Windows of `window` characters starting every `stride` characters; window 0 scores all its
    targets, window k > 0 only its last `stride` (the rest were scored before). Padded at the end of
    the split with IGNORE. `batch_size` windows per item; every item starts from an empty state.
    `rank`/`world` take every world-th window starting at rank. Each item is read from `ids` when asked for."""

    def __init__(self, ids: torch.Tensor, window: int, stride: int, batch_size: int, rank: int = 0, world: int = 1):
        if not 0 < stride <= window:
            raise ValueError(f"eval.stride={stride}: must be in 1..{window} (the model's context)")
        n_targets = len(ids) - 1
        n_windows = 1 + max(0, -(-(n_targets - window) // stride))
        self.ids, self.window, self.stride, self.batch_size = ids, window, stride, batch_size
        self.order = torch.arange(rank, max(rank, n_windows), world)  # this rank's windows
        first = torch.where(self.order == 0, 0, self.order * stride + window - stride)  # each one's first target
        self.targets = int((torch.clamp(self.order * stride + window, max=n_targets) - first).clamp(min=0).sum())

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = self.order[i * self.batch_size : (i + 1) * self.batch_size]                 # (B,) windows
        pos = k[:, None] * self.stride + torch.arange(self.window + 1)                  # (B, T+1)
        valid = pos < len(self.ids)
        w = torch.where(valid, self.ids[pos.clamp(max=len(self.ids) - 1)].long(), 0)   # (B, T+1)
        y = w[:, 1:].masked_fill(~valid[:, 1:], IGNORE)                                 # (B, T)
        y[k > 0, : self.window - self.stride] = IGNORE  # already scored by the previous window
        return Batch(w[:, :-1], y, True)

    @property
    def x(self) -> torch.Tensor:
        """Every window's inputs at once, (W, T): for looking at a small split."""
        return torch.cat([self[i].x for i in range(len(self))])

    @property
    def y(self) -> torch.Tensor:
        """Every window's targets at once, (W, T), IGNORE where not scored: for looking at a small split."""
        return torch.cat([self[i].y for i in range(len(self))])


def eval_dataset(ids: torch.Tensor, context_size: int | None, streams: int, chunk: int, stride: int | None,
                 batch_size: int, rank: int = 0, world: int = 1) -> Dataset:
    """The yardstick's batches for a model whose usable context is `context_size` (None: unbounded)."""
    if context_size is None:
        return EvalStreams(ids, chunk, streams, rank, world)
    window = min(context_size, len(ids) - 1)
    return SlidingWindows(ids, window, min(stride or max(1, window // 2), window), batch_size, rank, world)


def protocol(context_size: int | None, streams: int, chunk: int, stride: int | None, chars: int) -> dict:
    """How the figure was measured, for results.json and the leaderboard."""
    if context_size is None:
        return {"kind": "streams", "streams": streams, "chunk": chunk, "chars_scored": chars,
                "text": f"{streams} streams, state carried, {chars:,} chars scored once"}
    stride = stride or max(1, context_size // 2)
    return {"kind": "window", "window": context_size, "stride": stride, "chars_scored": chars,
            "text": f"sliding window {context_size}, stride {stride}, {chars:,} chars scored once"}


def _tree_to(state, device):
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, state)


def progress_bar(what: str, total: int | None):
    """A bar counting the characters scored of `total` (tqdm, as Lightning's bar), on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="char", unit_scale=True, mininterval=1.0, dynamic_ncols=True)


@torch.no_grad()
def score_rows(model: torch.nn.Module, batches, device: torch.device | str = "cpu", progress: str | None = None):
    """Per-row sums of nats and counts of scored characters over the yardstick batches, the state carried
    between them unless `reset`. For `EvalStreams` a row is a stream. The model must be in eval mode.
    `progress`: show a bar with this label, counting the characters scored of those the batches hold."""
    row_total = row_count = None
    state = None
    bar = progress_bar(progress, getattr(batches, "targets", None)) if progress else None
    for x, y, reset in batches:
        x, y = x.to(device), y.to(device)
        logits, state = model(x, None if reset else state)                       # (B, T, V)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                               reduction="none").view_as(y)                      # (B, T)
        t, c = nats.double().sum(1).cpu(), (y != IGNORE).sum(1).cpu()           # (B,) each
        if bar is not None:
            bar.update(int(c.sum()))
        if row_total is None or len(t) != len(row_total):  # (streams keep their rows; for windows only the sum counts)
            row_total = t if row_total is None else torch.cat([row_total, t])
            row_count = c if row_count is None else torch.cat([row_count, c])
        else:
            row_total, row_count = row_total + t, row_count + c
    if bar is not None:
        bar.close()
    if row_total is None:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return row_total, row_count


def score(model: torch.nn.Module, batches, device: torch.device | str = "cpu") -> tuple[float, int]:
    """(sum of nats, characters scored) over the yardstick batches (see `score_rows`)."""
    total, count = score_rows(model, batches, device)
    return float(total.sum()), int(count.sum())


def stream_means(batches, row_total: torch.Tensor, row_count: torch.Tensor) -> list[float] | None:
    """Each stream's mean loss (nats), when the batches are streams; None for sliding windows."""
    if not isinstance(batches, EvalStreams) or len(row_total) < 2:
        return None
    return [float(t / max(int(c), 1)) for t, c in zip(row_total, row_count)]


LATCH_README = "README.md#cold-starts-and-latched-streams"


def far_streams(means: list[float] | None, z: float = 3.5, rel: float = 0.25) -> list[int]:
    """Streams whose mean loss is far above the others: robust z-score 0.6745 (x - median) / MAD above `z`
    (Iglewicz and Hoaglin's rule: median and median absolute deviation, so one outlier cannot hide itself
    by inflating the spread) and at least `rel` above the median. Only the bad side counts."""
    if not means or len(means) < 3:
        return []
    t = torch.tensor(means, dtype=torch.float64)
    med = float(t.median())
    mad = float((t - med).abs().median())
    out = []
    for i, m in enumerate(means):
        robust = 0.6745 * (m - med) / mad if mad > 0 else (math.inf if m > med else 0.0)
        if robust > z and m > med * (1 + rel):
            out.append(i)
    return out


def latch_warning(means: list[float] | None) -> str | None:
    """One line naming the streams that latched into a bad state from their cold start, or None."""
    bad = far_streams(means)
    if not bad:
        return None
    med = float(torch.tensor(means).median())
    names = ", ".join(f"stream {i} ({means[i]:.3f} nats)" for i in bad)
    return (f"warning: {names} far above the other streams' median {med:.3f}: the model latched into a bad "
            f"state from a cold start (see {LATCH_README})")


@torch.no_grad()
def window_loss(model: torch.nn.Module, ids: torch.Tensor, window: int = 256, batches: int = 20,
                batch_size: int = 32, seed: int = 1337, device: torch.device | str = "cpu") -> dict:
    """nanoGPT-style: mean loss over `batches` x `batch_size` random windows of `window` characters,
    every position scored from an empty state (so early positions have little context)."""
    window = min(window, len(ids) - 1)
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    offsets = torch.arange(window + 1)
    for _ in range(batches):
        ix = torch.randint(len(ids) - window, (batch_size,), generator=g)
        w = ids[ix[:, None] + offsets].long().to(device)                         # (B, T+1)
        logits, _ = model(w[:, :-1])                                              # (B, T, V)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "bpc": loss / math.log(2), "window": window, "windows": batches * batch_size,
            "seed": seed}
