"""CharDataModule: text through HF `datasets` -> ids -> random windows or contiguous streams.

Batch k of training is a pure function of (seed, k), so a resumed run draws exactly the
batches the uninterrupted run would have drawn: the data position is the step counter.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from charlm.vocab import CharVocab

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".xml", ".html", ".py")


class CorpusError(ValueError):
    """The corpus cannot be used: missing, empty, binary, too short..."""


def embedded_corpus(name: str = "tinyshakespeare") -> str:
    """Path of a corpus shipped inside the package."""
    path = resources.files("charlm.corpora") / f"{name}.txt"
    if not path.is_file():
        raise CorpusError(f"no embedded corpus named {name!r}")
    return str(path)


def resolve_files(path: str) -> list[str]:
    """A file, a folder (its text files, recursively) or a glob -> sorted list of files."""
    p = Path(os.path.expanduser(path))
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(
            str(f) for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES and not f.name.startswith(".")
        )
        if not files:
            raise CorpusError(f"{path}: folder has no text files ({', '.join(TEXT_SUFFIXES[:3])}, ...)")
        return files
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f))
        if not files:
            raise CorpusError(f"{path}: glob matches no files")
        return files
    raise CorpusError(f"{path}: no such file or folder")


def _check_readable(files: list[str], errors: str) -> None:
    """Fail early, naming the file, on empty, binary or non-UTF-8 input."""
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(1 << 16)
        if errors == "strict" and b"\x00" in head:
            raise CorpusError(f"{f}: looks binary (NUL bytes); pass data.errors=replace to read it anyway")


def load_lines(path: str | None, errors: str = "strict"):
    """The corpus as an Arrow-backed `datasets.Dataset` of lines with their line breaks kept, read with
    `datasets.load_dataset("text", ...)`: concatenating the rows gives the files' text back exactly.
    Arrow keeps it on disk, so a corpus larger than RAM can be read batch by batch."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    files = resolve_files(path or embedded_corpus())
    _check_readable(files, errors)
    try:
        return datasets.load_dataset(
            "text", data_files=files, sample_by="line", keep_linebreaks=True, split="train",
            encoding_errors=errors,
        )
    except Exception as e:  # noqa: BLE001 - datasets wraps decode errors in its own exception types
        cause = e
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError):
            raise CorpusError(
                f"{path}: not UTF-8 ({cause.reason} at byte {cause.start}); "
                "pass data.errors=replace to read it anyway"
            ) from None
        raise CorpusError(f"{path}: could not read corpus ({type(e).__name__}: {e})") from None


def iter_text(ds, chars_per_chunk: int = 1 << 23):
    """The corpus text in chunks of roughly `chars_per_chunk` characters."""
    rows = max(1, chars_per_chunk // 64)
    for batch in ds.iter(batch_size=rows):
        yield "".join(batch["text"])


def load_text(path: str | None, errors: str = "strict") -> str:
    """The whole corpus as one string (small corpora; training goes through `encode_corpus`)."""
    text = "".join(iter_text(load_lines(path, errors)))
    if not text:
        raise CorpusError(f"{path or 'corpus'}: empty")
    return text


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
            yield w[:, :-1], w[:, 1:]
            k += 1


class Streams(IterableDataset):
    """Endless (x, y) batches from `batch_size` contiguous streams: row b of batch k follows row b of batch k-1.

    The corpus is cut into B equal streams (as char-rnn and word_language_model do); a model
    that carries its state across batches sees each stream as one long sequence (truncated BPTT).
    """

    def __init__(self, ids: torch.Tensor, block_size: int, batch_size: int, start: int = 0):
        n = (len(ids) - 1) // batch_size
        if n < block_size + 1:
            raise CorpusError(f"train split too short for {batch_size} streams of block_size {block_size}")
        self.ids, self.block_size, self.batch_size, self.start = ids, block_size, batch_size, start
        self.stream_len = n
        self.chunks = (n - 1) // block_size  # chunks per pass over the streams

    def __iter__(self):
        rows = torch.arange(self.batch_size)[:, None] * self.stream_len
        offsets = torch.arange(self.block_size + 1)
        k = self.start
        while True:
            pos = (k % self.chunks) * self.block_size
            w = self.ids[rows + pos + offsets].long()  # (B, T+1)
            reset = pos == 0  # a new pass over the streams: carried state must be dropped (a bool: no sync)
            yield w[:, :-1], w[:, 1:], reset
            k += 1


class EvalBatches(Dataset):
    """Every consecutive window of a split, in order, `batch_size` windows per item: a full deterministic
    pass. The tail that does not fill a window becomes a last, shorter batch of one row."""

    def __init__(self, ids: torch.Tensor, block_size: int, batch_size: int):
        self.ids, self.block_size, self.batch_size = ids, block_size, batch_size
        self.n_full = (len(ids) - 1) // block_size
        self.tail = (len(ids) - 1) % block_size
        self.n_batches = -(-self.n_full // batch_size) + (1 if self.tail else 0)

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, i: int):
        T = self.block_size
        first = i * self.batch_size
        if first >= self.n_full:  # the tail
            w = self.ids[self.n_full * T :].long()[None]  # (1, tail+1)
        else:
            rows = torch.arange(first, min(first + self.batch_size, self.n_full))[:, None] * T
            w = self.ids[rows + torch.arange(T + 1)].long()  # (b, T+1)
        return w[:, :-1], w[:, 1:]


class EvalStreams(Dataset):
    """A full deterministic pass as `batch_size` contiguous streams, chunk after chunk: a model that
    carries its state through them is evaluated with all the context before each character (as it
    was trained in stream mode). Item i is (x, y, reset) with reset true for the first chunk."""

    def __init__(self, ids: torch.Tensor, block_size: int, batch_size: int):
        self.batch_size = max(1, min(batch_size, (len(ids) - 1) // block_size))
        self.stream_len = (len(ids) - 1) // self.batch_size
        self.ids, self.block_size = ids, block_size
        self.n = -(-self.stream_len // block_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        start = i * self.block_size
        T = min(self.block_size, self.stream_len - start)
        rows = torch.arange(self.batch_size)[:, None] * self.stream_len
        w = self.ids[rows + start + torch.arange(T + 1)].long()  # (B, T+1)
        return w[:, :-1], w[:, 1:], i == 0


def cache_dir() -> Path:
    """Where encoded corpora are cached (CHARLM_CACHE, default ~/.cache/charlm)."""
    return Path(os.environ.get("CHARLM_CACHE") or Path.home() / ".cache" / "charlm")


def _torch_ids(ids: np.ndarray) -> torch.Tensor:
    """A tensor over the same memory (no copy of a memory map); uint16 widens to int32 for torch."""
    if ids.dtype == np.uint16:
        ids = ids.astype(np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory maps are fine: ids are never written
        return torch.from_numpy(ids)


def corpus_key(files: list[str], errors: str) -> str:
    """Content hash of the corpus files (and the decode policy): the cache key."""
    h = hashlib.sha256(errors.encode())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        h.update(b"\0end-of-file\0")
    return h.hexdigest()[:32]


def encode_corpus(path: str | None, errors: str = "strict") -> tuple[CharVocab, torch.Tensor]:
    """The corpus's own vocabulary and its ids, encoded once per content hash and memory-mapped after.

    Two passes over the Arrow-backed lines, a chunk at a time (vocabulary and length, then ids written
    into a memory-mapped `.npy`), so memory stays flat whatever the corpus size. The ids are stored
    compactly (uint8, or int32 past 256 characters) in `cache_dir()/HASH.ids.npy`.
    """
    files = resolve_files(path or embedded_corpus())
    _check_readable(files, errors)
    key = corpus_key(files, errors)
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:  # read-only home: encode into a temporary folder
        folder = Path(tempfile.mkdtemp(prefix="charlm-"))
    ids_path, vocab_path = folder / f"{key}.ids.npy", folder / f"{key}.vocab.json"
    if not (ids_path.exists() and vocab_path.exists()):
        ds = load_lines(path, errors)
        points, n = set(), 0
        for chunk in iter_text(ds):
            cp = np.frombuffer(chunk.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
            points.update(np.unique(cp).tolist())
            n += len(cp)
        if n == 0:
            raise CorpusError(f"{path or 'corpus'}: empty")
        vocab = CharVocab([chr(p) for p in sorted(points)])
        dtype = np.uint8 if len(vocab) <= 256 else np.int32
        tmp = ids_path.with_name(f".{ids_path.name}.{os.getpid()}.tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,))
        pos = 0
        for chunk in iter_text(ds):
            ids = vocab.encode_array(chunk)
            out[pos : pos + len(ids)] = ids
            pos += len(ids)
        out.flush()
        del out
        os.replace(tmp, ids_path)
        tmp = vocab_path.with_name(f".{vocab_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(vocab.to_dict()))
        os.replace(tmp, vocab_path)
    vocab = CharVocab.from_dict(json.loads(vocab_path.read_text()))
    return vocab, _torch_ids(np.load(ids_path, mmap_mode="r"))


class CharDataModule(L.LightningDataModule):
    """Loads a corpus, builds (or checks against) a vocabulary, splits it and serves batches."""

    def __init__(
        self,
        path: str | None = None,
        name: str = "text",
        block_size: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        sampling: str = "random",
        errors: str = "strict",
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
        self.path, self.name = path, name
        self.block_size, self.batch_size, self.eval_batch_size = block_size, batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.sampling, self.errors, self.seed = sampling, errors, seed
        self.vocab = vocab
        self.splits: dict[str, torch.Tensor] = {}

    def prepare(self) -> None:
        """Read, encode and split the corpus (idempotent; also called by `setup`)."""
        if self.splits:
            return
        corpus_vocab, ids = encode_corpus(self.path, self.errors)
        if self.vocab is None:
            self.vocab = corpus_vocab
        elif self.vocab != corpus_vocab:  # e.g. resuming on another corpus: map into the checkpoint's ids
            missing = [c for c in corpus_vocab.chars if c not in self.vocab.stoi]
            if missing:
                raise CorpusError(f"{self.path or self.name}: characters not in the vocabulary: "
                                  f"{''.join(missing)[:40]!r} (the checkpoint's vocabulary)")
            mapping = np.array([self.vocab.stoi[c] for c in corpus_vocab.chars], dtype=np.int32)
            ids = _torch_ids(mapping[np.asarray(ids)].astype(self.vocab.id_dtype))
        n = len(ids)
        n_val, n_test = int(n * self.val_fraction), int(n * self.test_fraction)
        n_train = n - n_val - n_test
        self.splits = {"train": ids[:n_train], "val": ids[n_train : n_train + n_val], "test": ids[n_train + n_val :]}
        where = self.path or self.name
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
        if self.sampling == "stream":
            return Streams(ids, self.block_size, self.batch_size, start)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return RandomWindows(ids, self.block_size, self.batch_size, self.seed + 7919 * rank, start)

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else 0
        # own generators: creating an iterator must not draw from the global RNG (exact resume)
        return DataLoader(self.train_dataset(start), batch_size=None, generator=torch.Generator())

    def _eval_loader(self, split: str) -> DataLoader:
        if self.sampling == "stream":
            ds = EvalStreams(self.splits[split], self.block_size, self.batch_size)
        else:
            ds = EvalBatches(self.splits[split], self.block_size, self.eval_batch_size)
            if self.trainer is not None and self.trainer.world_size > 1:  # each batch on one rank once, no padding
                ds = Subset(ds, range(self.trainer.global_rank, len(ds), self.trainer.world_size))
        return DataLoader(ds, batch_size=None, shuffle=False, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
