"""`data=recall`: a synthetic memory-span task, served as ordinary next-character prediction.

The text is a stream of episodes, each

    S....?S\\n      or, with n_fillers=4,     Sa.cb?S\\n

(a symbol S, `lag` fillers, the cue "?", S again, a newline), S drawn from the first `n_symbols`
capital letters, fillers from the first `n_fillers` of ".abc...", the lag in [min_lag, max_lag],
uniform by default, or log-uniform (as many lags of 1-2 as of 32-64: a curriculum that lets even
a vanilla RNN learn long lags step by step). After "?" the next character is the symbol seen
lag+1 characters earlier: predicting it needs a memory that spans the lag, and random fillers
make that memory hold against noise; the rest is unpredictable (fillers, next symbol) or trivial.
`val/recall_acc` is the accuracy at the recall positions (the input is "?" and its symbol lies
inside the window), logged by `RecallAccuracy`; `lag_accuracy` scores one lag at a time.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from charlm.data import CharDataModule, RandomWindows
from charlm.errors import CorpusError
from charlm.vocab import CharVocab
from charlm.yardstick import Batch

SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FILLERS, CUE, SEP = ".abcdefghijklmnopqrstuvwxyz", "?", "\n"


def episode(symbol: str, filler: str, pad: int = 0) -> str:
    """One episode: the symbol, the fillers, the cue, the symbol again, 1 + pad newlines."""
    return f"{symbol}{filler}{CUE}{symbol}{SEP * (1 + pad)}"


def sample_lags(rng: np.random.Generator, n: int, min_lag: int, max_lag: int, dist: str) -> np.ndarray:
    """n lags in [min_lag, max_lag]: `uniform`, or `log` (lag+1 log-uniform: each scale as common as the next)."""
    if dist == "uniform":
        return rng.integers(min_lag, max_lag + 1, n)
    lo, hi = np.log(min_lag + 1), np.log(max_lag + 2)
    return np.minimum(np.floor(np.exp(rng.uniform(lo, hi, n))).astype(np.int64) - 1, max_lag)


def episode_stream(n_chars: int, n_symbols: int, n_fillers: int, min_lag: int, max_lag: int, seed: int,
                   dist: str = "uniform", padded: bool = False) -> str:
    """At least `n_chars` characters of whole episodes (symbols, fillers and lags from `seed`);
    `padded`: newlines make every episode max_lag + 4 characters long."""
    rng = np.random.default_rng(seed)
    n = -(-n_chars // (max_lag + 4)) if padded else n_chars // (min_lag + 4) + 1  # enough whole episodes
    syms = rng.integers(0, n_symbols, n)
    lags = sample_lags(rng, n, min_lag, max_lag, dist)
    fill = np.array(list(FILLERS[:n_fillers]))[rng.integers(0, n_fillers, int(lags.sum()))]
    ends = np.cumsum(lags)
    text = "".join(episode(SYMBOLS[s], "".join(fill[e - g : e]), max_lag - g if padded else 0)
                   for s, g, e in zip(syms, lags, ends))
    return text if padded else text[: text.index(SEP, n_chars - 1) + 1]  # whole episodes, about n_chars


def recall_vocab(n_symbols: int, n_fillers: int) -> CharVocab:
    return CharVocab(SYMBOLS[:n_symbols] + FILLERS[:n_fillers] + CUE + SEP)


def recall_mask(x: torch.Tensor, cue_id: int, filler_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose input is the cue and whose symbol (the last non-filler
    character before it) lies inside the window, so the target is predictable from x alone."""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device).expand_as(x)                   # (B, T)
    filler = torch.isin(x, filler_ids.to(x.device))                       # (B, T)
    last = torch.where(~filler, pos, torch.full_like(pos, -1))            # (B, T): own index if non-filler
    last = last.cummax(dim=1).values                                      # (B, T): last non-filler at or before t
    before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)  # (B, T): strictly before t
    return (x == cue_id) & (before >= 0)


def recall_hits(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cue_id: int, filler_ids: torch.Tensor):
    """(correct, total) argmax predictions at the recall positions of a batch; logits (B, T, V)."""
    mask = recall_mask(x, cue_id, filler_ids)                            # (B, T)
    correct = (logits.argmax(-1) == y) & mask                             # (B, T)
    return int(correct.sum()), int(mask.sum())


class RecallAccuracy(L.Callback):
    """Logs `val/recall_acc`: accuracy at the recall positions over the whole val pass."""

    def __init__(self, vocab: CharVocab):
        self.cue_id = vocab.stoi[CUE]
        self.filler_ids = torch.tensor([i for c, i in vocab.stoi.items() if c in FILLERS])
        self.correct = self.total = 0
        self.history: list[tuple[int, float]] = []  # (step, accuracy) per validation

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.correct = self.total = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, y = batch[0], batch[1]
        logits, _ = pl_module.model(x)                                    # (B, T, V)
        c, n = recall_hits(logits, x, y, self.cue_id, self.filler_ids)
        self.correct += c
        self.total += n

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        acc = self.correct / self.total if self.total else float("nan")
        pl_module.log("val/recall_acc", acc, sync_dist=False)
        if not trainer.sanity_checking:
            self.history.append((trainer.global_step, acc))


@torch.no_grad()
def lag_accuracy(model: torch.nn.Module, vocab: CharVocab, lag: int, n_symbols: int, n_fillers: int,
                 n: int = 256, seed: int = 0) -> float:
    """Recall accuracy at one lag: n rows "\\n S ....? " (lag fillers), each scored at its last position."""
    g = torch.Generator().manual_seed(seed * 7919 + lag)
    ids = torch.tensor([vocab.stoi[c] for c in SYMBOLS[:n_symbols]])[torch.randint(0, n_symbols, (n,), generator=g)]
    fillers = torch.tensor([vocab.stoi[c] for c in FILLERS[:n_fillers]])
    fill = fillers[torch.randint(0, n_fillers, (n, lag), generator=g)]     # (n, lag)
    x = torch.cat([torch.full((n, 1), vocab.stoi[SEP]), ids[:, None], fill,
                   torch.full((n, 1), vocab.stoi[CUE])], 1)                    # (n, lag+3)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, _ = model(x.to(device))                                         # (n, lag+3, V)
    model.train(was_training)
    return float((logits[:, -1].argmax(-1).cpu() == ids).float().mean())


def episode_starts(ids: torch.Tensor, sep_id: int, block_size: int) -> torch.Tensor:
    """Offsets of the newlines just before a symbol, where a window of block_size+1 ids still fits."""
    head = ids[: max(0, len(ids) - block_size)]  # a window at p needs ids[p : p + block_size + 1]
    starts = ((head == sep_id) & (ids[1 : len(head) + 1] != sep_id)).nonzero().flatten()
    if len(starts) == 0:
        raise CorpusError(f"recall: no whole window of data.block_size={block_size} starts at an episode; "
                          "raise data.n_chars or lower data.max_lag")
    return starts


class EpisodeEvalBatches(Dataset):
    """A deterministic pass: windows that start at an episode, each the first such start at or after
    the previous window's end, `batch_size` windows per item."""

    def __init__(self, ids: torch.Tensor, starts: torch.Tensor, block_size: int, batch_size: int):
        chosen, nxt = [], 0
        for s in starts.tolist():
            if s >= nxt:
                chosen.append(s)
                nxt = s + block_size
        self.ids, self.block_size, self.batch_size = ids, block_size, batch_size
        self.offsets = torch.tensor(chosen)

    def __len__(self) -> int:
        return -(-len(self.offsets) // self.batch_size)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        ix = self.offsets[i * self.batch_size : (i + 1) * self.batch_size]
        w = self.ids[ix[:, None] + torch.arange(self.block_size + 1)].long()  # (b, T+1)
        return Batch(w[:, :-1], w[:, 1:], True)


class RecallDataModule(CharDataModule):
    """CharDataModule over an episode stream.

    `aligned` (the default): one episode per window. Newlines pad every episode to max_lag + 4
    characters and each window starts at the newline before a symbol, so with block_size =
    max_lag + 3 a window holds exactly one episode and the model meets its symbol with a fresh
    state, as `lag_accuracy` scores it; recalling means finding the one symbol, not the most
    recent of several (which a transformer with absolute positions learns slowly). Otherwise
    windows start anywhere in an unpadded stream, as in a text corpus (sampling=stream too).
    """

    def __init__(
        self,
        n_symbols: int = 8,
        n_fillers: int = 8,
        min_lag: int = 0,
        max_lag: int = 64,
        n_chars: int = 300_000,
        lag_dist: str = "uniform",
        aligned: bool = True,
        name: str = "recall",
        block_size: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        val_fraction: float = 0.1,
        sampling: str = "random",
        seed: int = 1337,
        vocab: CharVocab | None = None,
    ):
        super().__init__(name=name, block_size=block_size, batch_size=batch_size,
                         val_fraction=val_fraction, sampling=sampling, seed=seed, vocab=vocab)
        self.eval_batch_size = eval_batch_size
        if not 1 <= n_symbols <= len(SYMBOLS):
            raise ValueError(f"data.n_symbols={n_symbols}: must be in 1..{len(SYMBOLS)}")
        if not 1 <= n_fillers <= len(FILLERS):
            raise ValueError(f"data.n_fillers={n_fillers}: must be in 1..{len(FILLERS)}")
        if not 0 <= min_lag <= max_lag:
            raise ValueError(f"data.min_lag={min_lag}, data.max_lag={max_lag}: need 0 <= min_lag <= max_lag")
        if lag_dist not in ("log", "uniform"):
            raise ValueError(f"data.lag_dist={lag_dist!r}: must be 'log' or 'uniform'")
        self.n_symbols, self.min_lag, self.max_lag, self.n_chars = n_symbols, min_lag, max_lag, n_chars
        if aligned and block_size < max_lag + 3:
            raise ValueError(f"data.block_size={block_size}: aligned windows must hold a whole episode, "
                             f"max_lag + 3 = {max_lag + 3} characters")
        self.n_fillers, self.lag_dist, self.aligned = n_fillers, lag_dist, aligned

    def prepare(self) -> None:
        """Generate the episode stream from `seed`, then encode and split it as any corpus."""
        if self.splits:
            return
        own = recall_vocab(self.n_symbols, self.n_fillers)
        if self.vocab is None:
            self.vocab = own
        elif any(c not in self.vocab.stoi for c in own.chars):
            missing = "".join(sorted(set(own.chars) - set(self.vocab.chars)))
            raise CorpusError(f"recall: the checkpoint's vocabulary lacks {missing!r}")
        text = episode_stream(self.n_chars, self.n_symbols, self.n_fillers, self.min_lag, self.max_lag, self.seed,
                              self.lag_dist, padded=self.aligned)
        ids = torch.from_numpy(self.vocab.encode_array(text).astype(np.int32))
        n_val = int(len(ids) * self.val_fraction)
        self.splits = {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val :], "test": ids[:0]}
        for split in ("train", "val"):
            if len(self.splits[split]) < self.block_size + 1:
                raise CorpusError(f"recall: {split} split has {len(self.splits[split])} characters, "
                                  f"fewer than one window (data.block_size={self.block_size} + 1); raise data.n_chars")

    def train_dataset(self, start: int = 0) -> IterableDataset:
        if not self.aligned or self.sampling == "stream":
            return super().train_dataset(start)
        ids = self.splits["train"]
        rank = self.trainer.global_rank if self.trainer is not None else 0
        starts = episode_starts(ids, self.vocab.stoi[SEP], self.block_size)
        return RandomWindows(ids, self.block_size, self.batch_size, self.seed + 7919 * rank, start, starts=starts)

    def val_dataloader(self) -> DataLoader:
        if not self.aligned or self.sampling == "stream":
            return super().val_dataloader()
        ids = self.splits["val"]
        ds = EpisodeEvalBatches(ids, episode_starts(ids, self.vocab.stoi[SEP], self.block_size), self.block_size,
                                self.eval_batch_size)
        return DataLoader(ds, batch_size=None, shuffle=False, generator=torch.Generator())

    def callbacks(self) -> list[L.Callback]:
        """Task metrics for charlm.train: `val/recall_acc`."""
        self.prepare()
        return [RecallAccuracy(self.vocab)]
