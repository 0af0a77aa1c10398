"""`data=recall`: a synthetic memory-span task, served as ordinary next-character prediction.

The text is a stream of episodes, each

    S . . . . ? S \\n          (a symbol S, `lag` fillers ".", the cue "?", S again, a newline)

with S drawn from the first `n_symbols` capital letters and lag uniform in [min_lag, max_lag].
After "?" the next character is the symbol seen lag+1 characters earlier: predicting it needs
a memory that spans the lag; everything else in an episode is either unpredictable (the new
symbol, when the fillers stop) or trivial. `val/recall_acc` is the accuracy at the recall
positions (the input is "?" and its symbol lies inside the window), logged by `RecallAccuracy`.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from charlm.data import CharDataModule, CorpusError
from charlm.vocab import CharVocab

SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FILLER, CUE, SEP = ".", "?", "\n"


def episode(symbol: str, lag: int) -> str:
    """One episode: the symbol, `lag` fillers, the cue, the symbol again, a newline."""
    return f"{symbol}{FILLER * lag}{CUE}{symbol}{SEP}"


def episode_stream(n_chars: int, n_symbols: int, min_lag: int, max_lag: int, seed: int) -> str:
    """At least `n_chars` characters of whole episodes (symbols and lags from `seed`)."""
    rng = np.random.default_rng(seed)
    mean_len = (min_lag + max_lag) / 2 + 3
    n = int(n_chars / mean_len * 1.2) + 16
    while True:
        syms = rng.integers(0, n_symbols, n)
        lags = rng.integers(min_lag, max_lag + 1, n)
        text = "".join(episode(SYMBOLS[s], int(g)) for s, g in zip(syms, lags))
        if len(text) >= n_chars:
            return text
        n *= 2


def recall_vocab(n_symbols: int) -> CharVocab:
    return CharVocab(SYMBOLS[:n_symbols] + FILLER + CUE + SEP)


def recall_mask(x: torch.Tensor, cue_id: int, filler_id: int) -> torch.Tensor:
    """(B, T) bool: positions whose input is the cue and whose symbol (the last non-filler
    character before it) lies inside the window, so the target is predictable from x alone."""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device).expand_as(x)                   # (B, T)
    last = torch.where(x != filler_id, pos, torch.full_like(pos, -1))     # (B, T): own index if non-filler
    last = last.cummax(dim=1).values                                      # (B, T): last non-filler at or before t
    before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)  # (B, T): strictly before t
    return (x == cue_id) & (before >= 0)


def recall_hits(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cue_id: int, filler_id: int):
    """(correct, total) argmax predictions at the recall positions of a batch; logits (B, T, V)."""
    mask = recall_mask(x, cue_id, filler_id)                              # (B, T)
    correct = (logits.argmax(-1) == y) & mask                             # (B, T)
    return int(correct.sum()), int(mask.sum())


class RecallAccuracy(L.Callback):
    """Logs `val/recall_acc`: accuracy at the recall positions over the whole val pass."""

    def __init__(self, vocab: CharVocab):
        self.cue_id, self.filler_id = vocab.stoi[CUE], vocab.stoi[FILLER]
        self.correct = self.total = 0
        self.history: list[tuple[int, float]] = []  # (step, accuracy) per validation

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.correct = self.total = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, y = batch[0], batch[1]
        logits, _ = pl_module.model(x)                                    # (B, T, V)
        c, n = recall_hits(logits, x, y, self.cue_id, self.filler_id)
        self.correct += c
        self.total += n

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        acc = self.correct / self.total if self.total else float("nan")
        pl_module.log("val/recall_acc", acc, sync_dist=False)
        if not trainer.sanity_checking:
            self.history.append((trainer.global_step, acc))


@torch.no_grad()
def lag_accuracy(model: torch.nn.Module, vocab: CharVocab, lag: int, n_symbols: int, n: int = 256,
                 seed: int = 0) -> float:
    """Recall accuracy at one lag: n rows "\\n S ....? " (lag fillers), each scored at its last position."""
    g = torch.Generator().manual_seed(seed * 7919 + lag)
    syms = torch.randint(0, n_symbols, (n,), generator=g)
    ids = torch.tensor([vocab.stoi[c] for c in SYMBOLS[:n_symbols]])[syms]  # (n,)
    fill = torch.full((n, lag), vocab.stoi[FILLER])
    x = torch.cat([torch.full((n, 1), vocab.stoi[SEP]), ids[:, None], fill,
                   torch.full((n, 1), vocab.stoi[CUE])], 1)                    # (n, lag+3)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, _ = model(x.to(device))                                         # (n, lag+3, V)
    model.train(was_training)
    return float((logits[:, -1].argmax(-1).cpu() == ids).float().mean())


class RecallDataModule(CharDataModule):
    """CharDataModule's batches (random windows or streams, full val passes) over an episode stream."""

    def __init__(
        self,
        n_symbols: int = 8,
        min_lag: int = 0,
        max_lag: int = 48,
        n_chars: int = 200_000,
        name: str = "recall",
        block_size: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        val_fraction: float = 0.1,
        sampling: str = "random",
        seed: int = 1337,
        vocab: CharVocab | None = None,
    ):
        super().__init__(name=name, block_size=block_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         val_fraction=val_fraction, sampling=sampling, seed=seed, vocab=vocab)
        if not 1 <= n_symbols <= len(SYMBOLS):
            raise ValueError(f"data.n_symbols={n_symbols}: must be in 1..{len(SYMBOLS)}")
        if not 0 <= min_lag <= max_lag:
            raise ValueError(f"data.min_lag={min_lag}, data.max_lag={max_lag}: need 0 <= min_lag <= max_lag")
        self.n_symbols, self.min_lag, self.max_lag, self.n_chars = n_symbols, min_lag, max_lag, n_chars

    def prepare(self) -> None:
        """Generate the episode stream from `seed`, then encode and split it as any corpus."""
        if self.splits:
            return
        own = recall_vocab(self.n_symbols)
        if self.vocab is None:
            self.vocab = own
        elif any(c not in self.vocab.stoi for c in own.chars):
            raise CorpusError(f"recall: the checkpoint's vocabulary lacks {sorted(set(own.chars) - set(self.vocab.chars))}")
        text = episode_stream(self.n_chars, self.n_symbols, self.min_lag, self.max_lag, self.seed)
        ids = torch.from_numpy(self.vocab.encode_array(text).astype(np.int32))
        n_val = int(len(ids) * self.val_fraction)
        self.splits = {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val :], "test": ids[:0]}
        for split in ("train", "val"):
            if len(self.splits[split]) < self.block_size + 1:
                raise CorpusError(f"recall: {split} split has {len(self.splits[split])} characters, "
                                  f"fewer than one window (data.block_size={self.block_size} + 1); raise data.n_chars")

    def callbacks(self) -> list[L.Callback]:
        """Task metrics for charlm.train: `val/recall_acc`."""
        self.prepare()
        return [RecallAccuracy(self.vocab)]
