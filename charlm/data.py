"""CharDataModule: text through HF `datasets` -> ids -> random windows or contiguous streams.

Batch k of training is a pure function of (seed, k), so a resumed run draws exactly the
batches the uninterrupted run would have drawn: the data position is the step counter.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import io
import json
import os
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from charlm.atomic import atomic_path, write_json
from charlm.errors import CorpusError, UnknownCharError
from charlm.vocab import CharVocab
from charlm.yardstick import Batch, eval_dataset

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".xml", ".html", ".py")


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


CACHE_FORMAT = 2  # bump when the cache layout changes: older entries are rebuilt


def _read_fresh(files: list[str], errors: str, h, chunk_bytes: int = 1 << 23):
    """The corpus text in chunks, read from the files themselves (never through the `datasets` cache, which
    knows local files by path and mtime only), decoded as `datasets`' "text" loader decodes them (UTF-8,
    universal newlines). Every byte read also goes into the hash `h`, as `corpus_key` hashes it."""
    h.update(errors.encode())
    for f in files:
        dec = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(errors), translate=True)
        pos = 0
        with open(f, "rb") as fh:
            while True:
                data = fh.read(chunk_bytes)
                h.update(data)
                pending = len(dec.getstate()[0])  # bytes of a character cut at the previous chunk's end
                try:
                    text = dec.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    raise CorpusError(
                        f"{f}: not UTF-8 ({e.reason} at byte {pos - pending + e.start}); "
                        "pass data.errors=replace to read it anyway"
                    ) from None
                pos += len(data)
                if text:
                    yield text
                if not data:
                    break
        h.update(b"\0end-of-file\0")


def _cached_ids(ids_path: Path, vocab_path: Path, meta_path: Path, key: str):
    """(vocab, ids) from the cache, or None when an entry is missing, unreadable or does not match its meta
    (length, dtype, vocabulary size): such an entry is rebuilt, never trusted."""
    try:
        meta = json.loads(meta_path.read_text())
        vocab = CharVocab.from_dict(json.loads(vocab_path.read_text()))
        ids = np.load(ids_path, mmap_mode="r")
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    ok = (
        isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT and meta.get("key") == key
        and meta.get("vocab_size") == len(vocab) and meta.get("dtype") == vocab.id_dtype.name
        and ids.dtype == vocab.id_dtype and ids.ndim == 1 and ids.shape[0] == meta.get("n")
    )
    return (vocab, ids) if ok else None


def encode_corpus(path: str | None, errors: str = "strict") -> tuple[CharVocab, torch.Tensor]:
    """The corpus's own vocabulary and its ids, encoded once per content hash and memory-mapped after.

    On a cache miss the files are read fresh, twice, a chunk at a time (vocabulary and length, then ids
    written into a memory-mapped `.npy`), so memory stays flat whatever the corpus size. The ids are stored
    compactly (uint8, uint16 or int32 following the vocabulary size) in `cache_dir()/HASH.ids.npy`, with the
    vocabulary and a meta file (length, dtype) beside them; every file is written atomically, the meta last.
    A cache entry whose ids do not match its meta is rebuilt.
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
    meta_path = folder / f"{key}.meta.json"
    cached = _cached_ids(ids_path, vocab_path, meta_path, key)
    if cached is not None:
        return cached[0], _torch_ids(cached[1])
    changed = CorpusError(f"{path or 'corpus'}: changed while it was being read; run again")
    h = hashlib.sha256()
    points, n = set(), 0
    for chunk in _read_fresh(files, errors, h):
        cp = np.frombuffer(chunk.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        points.update(np.unique(cp).tolist())
        n += len(cp)
    if h.hexdigest()[:32] != key:
        raise changed
    if n == 0:
        raise CorpusError(f"{path or 'corpus'}: empty")
    vocab = CharVocab([chr(p) for p in sorted(points)])
    h = hashlib.sha256()
    with atomic_path(ids_path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=vocab.id_dtype, shape=(n,))
        pos = 0
        for chunk in _read_fresh(files, errors, h):
            try:
                ids = vocab.encode_array(chunk)
            except UnknownCharError:
                raise changed from None
            if pos + len(ids) > n:
                raise changed
            out[pos : pos + len(ids)] = ids
            pos += len(ids)
        out.flush()
        del out
        if pos != n or h.hexdigest()[:32] != key:
            raise changed
    write_json(vocab_path, vocab.to_dict())
    write_json(meta_path, {"format": CACHE_FORMAT, "key": key, "n": n, "dtype": vocab.id_dtype.name,
                           "vocab_size": len(vocab)})
    return vocab, _torch_ids(np.load(ids_path, mmap_mode="r"))


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
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_cfg = {"context_size": None, "streams": 8, "chunk": 256, "stride": None, "batch_size": 64,
                         "max_chars": None}
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
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if self.sampling == "stream":
            return Streams(ids, self.block_size, self.batch_size, start, rank, world)
        return RandomWindows(ids, self.block_size, self.batch_size, self.seed + 7919 * rank, start)

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else 0
        # own generators: creating an iterator must not draw from the global RNG (exact resume)
        return DataLoader(self.train_dataset(start), batch_size=None, generator=torch.Generator())

    def configure_eval(self, context_size: int | None = None, streams: int = 8, chunk: int = 256,
                       stride: int | None = None, batch_size: int = 64, max_chars: int | None = None, **_) -> None:
        """How the yardstick scores the val/test split (`charlm.yardstick`): `context_size` None for
        streams with the state carried, else a sliding window of that many characters."""
        self.eval_cfg = {"context_size": context_size, "streams": streams, "chunk": chunk, "stride": stride,
                         "batch_size": batch_size, "max_chars": max_chars}

    def eval_ids(self, split: str) -> torch.Tensor:
        """The characters the yardstick scores: the split, or its first `eval.max_chars`."""
        ids = self.splits[split]
        n = self.eval_cfg["max_chars"]
        return ids[:n] if n else ids

    def eval_dataset(self, split: str = "val", rank: int = 0, world: int = 1):
        """The yardstick's batches over `split`; under DDP each rank its own streams or windows."""
        c = self.eval_cfg
        return eval_dataset(self.eval_ids(split), c["context_size"], c["streams"], c["chunk"], c["stride"],
                            c["batch_size"], rank, world)

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
