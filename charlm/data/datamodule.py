"""CharDataModule: a corpus (charlm.data.corpus) -> ids -> random windows or contiguous streams for training,
and the yardstick's passes (charlm.yardstick) for validation.

Batch k of training is a pure function of (seed, k), so a resumed run draws exactly the
batches the uninterrupted run would have drawn: the data position is the step counter.
"""

from __future__ import annotations

import tempfile

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from charlm.data.corpus import encode_corpus, id_view, writable_cache
from charlm.data.ids import CHUNK_IDS
from charlm.data.split import SPLITS, split_slice
from charlm.data.vocab import UNITS, CharVocab
from charlm.errors import CorpusError
from charlm.yardstick import Batch, eval_dataset


def unit_mismatch(where: str, vocab: CharVocab, unit: str) -> CorpusError:
    """The one-line refusal of a corpus read in another unit than the checkpoint's vocabulary."""
    return CorpusError(f"{where}: read as data.unit={unit}, but the checkpoint's model reads {vocab.unit}s "
                       f"(pass data.unit={vocab.unit})")


def size_note(name: str, n: int, unit: str, published: int | None) -> str | None:
    """A line saying a corpus is not the size of the published protocol it is named after, else None."""
    if not published or n == published:
        return None
    return (f"note: this {name} file has {n:,} {unit}s, not the protocol's {published:,}: its figures will not "
            "compare with the published tables")


def relabel(ids: torch.Tensor, table: np.ndarray, dtype: np.dtype) -> tuple[torch.Tensor, int]:
    """`ids` through `table` (corpus id -> another vocabulary's id; -1 drops the symbol: unknown=skip), in one
    pass a chunk at a time into an unnamed file in the cache folder, memory-mapped after: never a copy of the
    corpus in memory. Returns the new ids (stored as `dtype`) and how many were dropped."""
    src, dropped = ids.numpy(), 0
    with tempfile.TemporaryFile(prefix="charlm-ids-", dir=writable_cache()) as fh:
        for a in range(0, len(src), CHUNK_IDS):
            out = table[src[a : a + CHUNK_IDS]]
            if not (keep := out >= 0).all():
                dropped += int((~keep).sum())
                out = out[keep]
            fh.write(out.astype(dtype))
        fh.flush()
        n = len(src) - dropped
        return id_view(np.memmap(fh, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)), dropped


class RandomWindows(IterableDataset):
    """Endless (x, y) batches of `batch_size` windows at random offsets; batch k depends on (seed, k) only.
    `starts`, if given, lists the offsets a window may start at (e.g. episode starts in data=recall)."""

    def __init__(self, ids: torch.Tensor, block_size: int, batch_size: int, seed: int, start: int = 0,
                 starts: torch.Tensor | None = None):
        self.ids, self.block_size, self.batch_size, self.seed, self.start = ids, block_size, batch_size, seed, start
        self.starts = starts

    def __iter__(self):
        g = torch.Generator()
        offsets = torch.arange(self.block_size + 1)
        k = self.start
        while True:
            g.manual_seed(self.seed * 1_000_003 + k)
            if self.starts is None:
                ix = torch.randint(len(self.ids) - self.block_size - 1, (self.batch_size,), generator=g)
            else:
                ix = self.starts[torch.randint(len(self.starts), (self.batch_size,), generator=g)]
            w = self.ids[ix[:, None] + offsets].long()  # (B, T+1)
            yield Batch(w[:, :-1], w[:, 1:], True)
            k += 1


class Streams(IterableDataset):
    """Endless Batch(x, y, reset) from contiguous streams: row b of batch k follows row b of batch k-1.

    The corpus is cut into `batch_size * world` equal streams (as char-rnn and word_language_model
    do); rank r trains rows r*B..(r+1)*B-1, so under DDP every rank has its own streams. A model
    that carries its state across batches sees each stream as one long sequence (truncated BPTT).
    """

    def __init__(self, ids: torch.Tensor, block_size: int, batch_size: int, start: int = 0, rank: int = 0,
                 world: int = 1):
        n = (len(ids) - 1) // (batch_size * world)
        if n < block_size + 1:
            raise CorpusError(f"train split too short for {batch_size * world} streams of block_size {block_size}")
        self.ids, self.block_size, self.batch_size, self.start = ids, block_size, batch_size, start
        self.stream_len = n
        self.first_row = rank * batch_size
        self.chunks = (n - 1) // block_size  # chunks per pass over the streams

    def __iter__(self):
        rows = (self.first_row + torch.arange(self.batch_size))[:, None] * self.stream_len
        offsets = torch.arange(self.block_size + 1)
        k = self.start
        while True:
            pos = (k % self.chunks) * self.block_size
            w = self.ids[rows + pos + offsets].long()  # (B, T+1)
            reset = pos == 0  # a new pass over the streams: carried state must be dropped (a bool: no sync)
            yield Batch(w[:, :-1], w[:, 1:], reset)
            k += 1


class CharDataModule(L.LightningDataModule):
    """Loads a corpus, builds (or checks against) a vocabulary, splits it and serves batches."""

    def __init__(
        self,
        path: str | None = None,
        name: str = "text",
        block_size: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        sampling: str = "random",
        errors: str = "strict",
        unit: str = "char",
        published_size: int | None = None,
        seed: int = 1337,
        vocab: CharVocab | None = None,
    ):
        super().__init__()
        if sampling == "auto":  # charlm.train resolves auto from the model; standalone, windows
            sampling = "random"
        if sampling not in ("random", "stream"):
            raise ValueError(f"data.sampling={sampling!r}: must be 'auto', 'random' or 'stream'")
        if errors not in ("strict", "replace"):
            raise ValueError(f"data.errors={errors!r}: must be 'strict' or 'replace'")
        if unit not in UNITS:
            raise ValueError(f"data.unit={unit!r}: must be 'char' or 'byte'")
        self.path, self.name = path, name
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_cfg = {"context_size": None, "streams": 8, "chunk": 256, "stride": None, "batch_size": 64,
                         "max_chars": None, "final_max_chars": None}
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.sampling, self.errors, self.seed = sampling, errors, seed
        self.unit, self.published_size = unit, published_size  # published_size: the protocol's corpus length
        self.vocab = vocab
        self.splits: dict[str, torch.Tensor] = {}

    def read_corpus(self, path: str | None = None) -> tuple[CharVocab, torch.Tensor, dict[str, slice] | None]:
        """The vocabulary and ids of the corpus at `path` (default data.path), and where each split lies when
        the corpus brings its own splits (None: charlm's cut). charlm.data.hf reads a Hugging Face dataset here."""
        return (*encode_corpus(path or self.path, self.errors, self.unit), None)

    def prepare(self) -> None:
        """Read, encode and split the corpus (idempotent; also called by `setup`)."""
        if self.splits:
            return
        corpus_vocab, ids, own_splits = self.read_corpus()
        where = self.path or self.name
        if self.vocab is None:
            self.vocab = corpus_vocab
        elif self.vocab.unit != corpus_vocab.unit:
            raise unit_mismatch(where, self.vocab, corpus_vocab.unit)
        elif self.vocab != corpus_vocab:  # e.g. resuming on another corpus: map into the checkpoint's ids
            missing = [c for c in corpus_vocab.chars if c not in self.vocab.stoi]
            if missing:
                raise CorpusError(f"{self.path or self.name}: characters not in the vocabulary: "
                                  f"{''.join(missing)[:40]!r} (the checkpoint's vocabulary)")
            table = np.array([self.vocab.stoi[c] for c in corpus_vocab.chars])
            ids, _ = relabel(ids, table, self.vocab.id_dtype)  # a second memory-mapped file, not a copy in memory
        n = len(ids)
        if note := size_note(self.name, n, self.unit, self.published_size):
            print(note)
        self.splits = {s: ids[own_splits[s] if own_splits else split_slice(n, s, self.val_fraction, self.test_fraction)]
                       for s in SPLITS}
        n_test = len(self.splits["test"])
        for split in ("train", "val") + (("test",) if n_test else ()):
            if len(self.splits[split]) < self.block_size + 1:
                raise CorpusError(
                    f"{where}: {split} split has {len(self.splits[split])} characters, "
                    f"fewer than one window (data.block_size={self.block_size} + 1)"
                )

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def train_dataset(self, start: int = 0) -> IterableDataset:
        """Training batches starting at batch index `start` (the global step, on resume)."""
        ids = self.splits["train"]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if self.sampling == "stream":
            return Streams(ids, self.block_size, self.batch_size, start, rank, world)
        return RandomWindows(ids, self.block_size, self.batch_size, self.seed + 7919 * rank, start)

    def train_dataloader(self) -> IterableDataset:
        """The batches themselves: each item is a whole batch, made in this process, so no DataLoader goes
        around them (its per-batch machinery cost 25-45 us a batch on a 2-core CPU). Iterating draws nothing
        from the global RNG (exact resume)."""
        start = self.trainer.global_step if self.trainer is not None else 0
        return self.train_dataset(start)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """Every batch is made on the CPU: a CPU run has nothing to move (Lightning's generic walk over
        the batch would still visit each tensor, every step)."""
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_eval(self, context_size: int | None = None, streams: int = 8, chunk: int = 256,
                       stride: int | None = None, batch_size: int = 64, max_chars: int | None = None,
                       final_max_chars: int | None = None, **_) -> None:
        """How the yardstick scores the val/test split (`charlm.yardstick`): `context_size` None for
        streams with the state carried, else a sliding window of that many characters."""
        self.eval_cfg = {"context_size": context_size, "streams": streams, "chunk": chunk, "stride": stride,
                         "batch_size": batch_size, "max_chars": max_chars, "final_max_chars": final_max_chars}

    def eval_ids(self, split: str, whole: bool = False) -> torch.Tensor:
        """The characters the yardstick scores: the split, or its first `eval.max_chars` (unless `whole`)."""
        ids = self.splits[split]
        n = None if whole else self.eval_cfg["max_chars"]
        return ids[:n] if n else ids

    def final_ids(self, split: str = "val") -> torch.Tensor:
        """The characters the end-of-run figure reads: the whole split, or with eval.final_max_chars = N its
        first N + 1 (N scored: the first character has nothing before it to be scored from)."""
        ids = self.splits[split]
        n = self.eval_cfg.get("final_max_chars")
        return ids[: n + 1] if n else ids

    def eval_dataset(self, split: str = "val", rank: int = 0, world: int = 1, whole: bool = False,
                     final: bool = False):
        """The yardstick's batches over `split`; under DDP each rank its own streams or windows. `whole`:
        the entire split, whatever eval.max_chars (which bounds the validations during training); `final`:
        what the end-of-run figure scores (`final_ids`)."""
        c = self.eval_cfg
        ids = self.final_ids(split) if final else self.eval_ids(split, whole)
        return eval_dataset(ids, c["context_size"], c["streams"], c["chunk"], c["stride"], c["batch_size"], rank, world)

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return DataLoader(self.eval_dataset(split, rank, world), batch_size=None, shuffle=False,
                          generator=torch.Generator())

    def callbacks(self) -> list:
        """Task-specific Lightning callbacks (metrics) a data module adds to training; none for text."""
        return []

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
