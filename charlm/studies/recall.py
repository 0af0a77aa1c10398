"""`data=recall`: a synthetic memory-span task, served as ordinary next-character prediction.

The text is one continuous stream of fillers (".-,:;...") with distractor symbols ("ABC...")
sprinkled among them, into which episodes are dropped at random offsets:

    .-C,:d-.A:,-?D:.-b,?B.,A-.f,-:.G-,?F:-

An episode is a store token s (the lowercase twin of a symbol S: "remember S"), `lag` noise
characters, the cue "?" and S. After "?" the next character is the symbol of the last store
token: predicting it needs a memory that holds S for lag+1 characters and is selective (the
distractors are the answer characters themselves, and must not overwrite it). Gaps between
episodes are random and windows start anywhere in the stream, so the position of s within a
window is uniform and carries no information (a transformer cannot attend to a fixed slot), and
a window holds several episodes when lags are short. (A separate marker before S, "!S", asks the
same of a recurrent model, but a small transformer then settles on "copy the latest symbol" and
needs far more steps than a CPU budget to find "the symbol after the marker".)

Curriculum (the design choice, see REPORT.md): training batches are generated on the fly; the
longest lag grows geometrically from `curriculum_start` to `max_lag` over the first
`curriculum_steps` steps, with lags log-uniform below that cap (each octave as common as the
next) all along, and the distractor rate ramps from 0 to `p_distract` over the same steps. A
model first learns the task where it can (a vanilla RNN at lags of a few characters, instead of
drowning in lags it can never bridge) and keeps those short lags in every batch while the long
ones arrive: one run per model shows its best short-lag ability and its limit, for the price of
one run (one run per lag bucket would cost one run per bucket).

Batches: `sampling=stream` (recurrent models) serves `batch_size` independent endless streams,
chunk after chunk with the state carried (truncated BPTT: the gradient stops at each chunk of
`block_size`, the state does not); `sampling=random` serves windows at random offsets of fresh
streams. Batch k is a pure function of (seed, k) either way (a resumed run replays the streams).
The val split is a fixed stream with the full lag range, scored by the yardstick; `val/recall_acc`
is the accuracy at the cue positions. The lag-by-lag probe lives in `charlm.studies.probe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import lightning as L
import numpy as np
import torch
from torch.utils.data import IterableDataset

from charlm.data.datamodule import CharDataModule, unit_mismatch
from charlm.data.split import split_bounds
from charlm.data.vocab import CharVocab
from charlm.errors import CorpusError
from charlm.yardstick import IGNORE, Batch

SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"   # answers, and the distractors among the fillers
STORES = SYMBOLS.lower()                  # store token of each symbol: "remember S"
FILLERS, CUE = ".-,:;+=*~^", "?"


def recall_vocab(n_symbols: int, n_fillers: int, unit: str = "char") -> CharVocab:
    """The task's symbols (ASCII: the same ids read as characters or as bytes)."""
    return CharVocab(SYMBOLS[:n_symbols] + STORES[:n_symbols] + FILLERS[:n_fillers] + CUE, unit)


@dataclass(frozen=True)
class Task:
    """The stream's parameters and the ids of its characters in `vocab`."""

    vocab: CharVocab
    n_symbols: int = 8
    n_fillers: int = 8
    p_distract: float = 0.25   # probability that a filler slot holds a random symbol instead
    max_gap: int = 16          # fillers between two episodes: uniform in 0..max_gap
    min_lag: int = 0
    lag_dist: str = "log"      # log (lag+1 log-uniform) | uniform

    @property
    def symbols(self) -> np.ndarray:
        return np.array([self.vocab.stoi[c] for c in SYMBOLS[: self.n_symbols]])

    @property
    def stores(self) -> np.ndarray:
        return np.array([self.vocab.stoi[c] for c in STORES[: self.n_symbols]])

    @property
    def fillers(self) -> np.ndarray:
        return np.array([self.vocab.stoi[c] for c in FILLERS[: self.n_fillers]])

    def lags(self, rng: np.random.Generator, n: int, max_lag: int) -> np.ndarray:
        """n lags in [min_lag, max_lag]: uniform, or log-uniform in lag+1 (each scale as common as the next)."""
        if self.lag_dist == "uniform":
            return rng.integers(self.min_lag, max_lag + 1, n)
        lo, hi = math.log(self.min_lag + 1), math.log(max_lag + 2)
        return np.minimum(np.floor(np.exp(rng.uniform(lo, hi, n))).astype(np.int64) - 1, max_lag)

    def noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) filler ids, each replaced by a random symbol (a distractor) with probability p_distract."""
        out = self.fillers[rng.integers(0, self.n_fillers, n)]
        hit = rng.random(n) < self.p_distract
        out[hit] = self.symbols[rng.integers(0, self.n_symbols, int(hit.sum()))]
        return out

    def episodes(self, rng: np.random.Generator, lags: np.ndarray) -> np.ndarray:
        """One episode per lag, each a random gap of noise then s, lag noise, "?S": (sum of lengths,) ids."""
        gaps = rng.integers(0, self.max_gap + 1, len(lags))
        lens = gaps + lags + 3
        store = np.cumsum(lens) - lens + gaps                # (m,) where each store token goes
        out = self.noise(rng, int(lens.sum()))
        k = rng.integers(0, self.n_symbols, len(lags))       # (m,) which symbol
        out[store], out[store + lags + 1], out[store + lags + 2] = self.stores[k], self.vocab.stoi[CUE], self.symbols[k]
        return out

    def stream(self, rng: np.random.Generator, n: int, max_lag: int, per_call: int = 64) -> np.ndarray:
        """At least n ids of whole episodes with lags up to max_lag."""
        parts, total = [], 0
        while total < n:
            parts.append(self.episodes(rng, self.lags(rng, per_call, max_lag)))
            total += len(parts[-1])
        return np.concatenate(parts)


def lag_cap(step: int, max_lag: int, curriculum_steps: int, start: int) -> int:
    """The longest lag at training step `step`: start+1 -> max_lag+1 geometrically over curriculum_steps."""
    if curriculum_steps <= 0 or step >= curriculum_steps or start >= max_lag:
        return max_lag
    frac = step / curriculum_steps
    return min(max_lag, int(round((start + 1) * ((max_lag + 1) / (start + 1)) ** frac)) - 1)


class EpisodeBatches(IterableDataset):
    """Endless Batch(x, y, reset) of (B, T) from fresh episode streams, the lag cap following the curriculum.

    stream: row b of batch k continues row b of batch k-1 (one rng per row; a resumed run replays
    the first `start` batches). random: batch k draws its own streams and cuts each window at a
    random offset past one longest episode (a burn-in, so the window's phase is random).
    """

    def __init__(self, task: Task, block_size: int, batch_size: int, seed: int, max_lag: int,
                 curriculum_steps: int, curriculum_start: int, stream: bool, start: int = 0):
        self.task, self.T, self.B, self.seed = task, block_size, batch_size, seed
        self.curriculum = (max_lag, curriculum_steps, curriculum_start)
        self.stream, self.start = stream, start

    def cap(self, k: int) -> int:
        return max(self.task.min_lag, lag_cap(k, *self.curriculum))

    def task_at(self, k: int) -> Task:
        """The task at step k: distractors ramp up with the curriculum, from none to p_distract."""
        steps = self.curriculum[1]
        frac = 1.0 if steps <= 0 else min(1.0, k / steps)
        return replace(self.task, p_distract=self.task.p_distract * frac)

    def _streams(self):
        rngs = [np.random.default_rng([self.seed, b]) for b in range(self.B)]
        bufs = [np.zeros(0, np.int64)] * self.B
        k = 0
        while True:
            need = self.T + 1 if k == 0 else self.T       # later windows reuse the previous window's last id
            for b, rng in enumerate(rngs):
                if len(bufs[b]) < need:
                    bufs[b] = np.concatenate([bufs[b], self.task_at(k).stream(rng, need, self.cap(k))])
            if k == 0:
                w = np.stack([buf[: self.T + 1] for buf in bufs])              # (B, T+1)
            else:
                w = np.concatenate([w[:, -1:], np.stack([buf[: self.T] for buf in bufs])], 1)  # (B, T+1)
            bufs = [buf[need:] for buf in bufs]
            yield k, w
            k += 1

    def _random(self):
        k = self.start
        while True:
            rng = np.random.default_rng([self.seed, 1 << 20, k])
            burn = self.cap(k) + self.task.max_gap + 4      # one longest episode
            rows = []
            for _ in range(self.B):
                s = self.task_at(k).stream(rng, 2 * burn + self.T + 1, self.cap(k))
                off = int(rng.integers(burn, 2 * burn))
                rows.append(s[off : off + self.T + 1])
            yield k, np.stack(rows)                                           # (B, T+1)
            k += 1

    def __iter__(self):
        for k, w in self._streams() if self.stream else self._random():
            if k >= self.start:
                w = torch.from_numpy(w).long()
                yield Batch(w[:, :-1], w[:, 1:], k == 0 or not self.stream)  # random windows: never a carried state


class RecallAccuracy(L.Callback):
    """Logs `val/recall_acc`: argmax accuracy at the cue positions over the whole val pass (each scored
    once, with the context the yardstick gives the model: its state carried, or its window)."""

    def __init__(self, vocab: CharVocab):
        self.cue_id = vocab.stoi[CUE]
        self.correct = self.total = 0
        self._state = None
        self.history: list[tuple[int, float]] = []  # (step, accuracy) per validation

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.correct = self.total = 0
        self._state = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, y, reset = batch
        logits, self._state = pl_module.model(x, None if reset else self._state)  # (B, T, V)
        mask = (x == self.cue_id) & (y != IGNORE)                                   # (B, T)
        self.correct += int(((logits.argmax(-1) == y) & mask).sum())
        self.total += int(mask.sum())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        counts = torch.tensor([self.correct, self.total], dtype=torch.float64, device=pl_module.device)
        correct, total = trainer.strategy.reduce(counts, reduce_op="sum").tolist()  # every rank's share
        acc = correct / total if total else float("nan")
        pl_module.log("val/recall_acc", acc, sync_dist=False)
        if not trainer.sanity_checking:
            self.history.append((trainer.global_step, acc))


class RecallDataModule(CharDataModule):
    """CharDataModule over the episode stream: fresh training batches (curriculum), a fixed val stream."""

    def __init__(
        self,
        n_symbols: int = 8,
        n_fillers: int = 8,
        p_distract: float = 0.25,
        max_gap: int = 16,
        min_lag: int = 0,
        max_lag: int = 64,
        lag_dist: str = "log",
        curriculum_steps: int = 0,
        curriculum_start: int = 4,
        n_chars: int = 50_000,
        name: str = "recall",
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.5,
        sampling: str = "random",
        unit: str = "char",
        seed: int = 1337,
        vocab: CharVocab | None = None,
    ):
        super().__init__(name=name, block_size=block_size, batch_size=batch_size,
                         val_fraction=val_fraction, sampling=sampling, unit=unit, seed=seed, vocab=vocab)
        checks = {"n_symbols": 1 <= n_symbols <= len(SYMBOLS), "n_fillers": 1 <= n_fillers <= len(FILLERS),
                  "p_distract": 0 <= p_distract < 1, "max_gap": max_gap >= 0, "min_lag": 0 <= min_lag <= max_lag,
                  "lag_dist": lag_dist in ("log", "uniform"), "curriculum_steps": curriculum_steps >= 0,
                  "curriculum_start": curriculum_start >= 0}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"data.{key}={locals()[key]!r}: out of range (see conf/data/recall.yaml)")
        self.n_symbols, self.n_fillers, self.p_distract, self.max_gap = n_symbols, n_fillers, p_distract, max_gap
        self.min_lag, self.max_lag, self.lag_dist, self.n_chars = min_lag, max_lag, lag_dist, n_chars
        self.curriculum_steps, self.curriculum_start = curriculum_steps, curriculum_start

    @property
    def task(self) -> Task:
        return Task(self.vocab, self.n_symbols, self.n_fillers, self.p_distract, self.max_gap, self.min_lag,
                    self.lag_dist)

    def prepare(self) -> None:
        """Generate the fixed stream (full lag range) from `seed` and split it; training draws fresh episodes,
        so `splits["train"]` is only a sample of the training distribution (sizes, logs)."""
        if self.splits:
            return
        own = recall_vocab(self.n_symbols, self.n_fillers, self.unit)
        if self.vocab is None:
            self.vocab = own
        elif self.vocab.unit != own.unit:
            raise unit_mismatch("recall", self.vocab, own.unit)
        elif any(c not in self.vocab.stoi for c in own.chars):
            missing = "".join(sorted(set(own.chars) - set(self.vocab.chars)))
            raise CorpusError(f"recall: the checkpoint's vocabulary lacks {missing!r}")
        rng = np.random.default_rng([self.seed, 1 << 30])
        ids = torch.from_numpy(self.task.stream(rng, self.n_chars, self.max_lag)[: self.n_chars].astype(np.int32))
        train_end, _ = split_bounds(len(ids), self.val_fraction)
        self.splits = {"train": ids[:train_end], "val": ids[train_end:], "test": ids[:0]}
        n_val = len(self.splits["val"])
        if len(self.splits["val"]) < self.block_size + 1:
            raise CorpusError(f"recall: val split has {n_val} characters, fewer than one window "
                              f"(data.block_size={self.block_size} + 1); raise data.n_chars")

    def train_dataset(self, start: int = 0) -> IterableDataset:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return EpisodeBatches(self.task, self.block_size, self.batch_size, self.seed + 7919 * rank, self.max_lag,
                              self.curriculum_steps, self.curriculum_start, self.sampling == "stream", start)

    def callbacks(self) -> list[L.Callback]:
        """Task metrics for charlm.train: `val/recall_acc`."""
        self.prepare()
        return [RecallAccuracy(self.vocab)]
