"""Corpora: local files (a file, a folder of text files, or a glob) -> a vocabulary and ids, as
characters (`unit=char`: UTF-8 text, universal newlines) or raw bytes (`unit=byte`: any file, nothing
decoded or translated; the enwik8 protocol). `read_corpus(data_config)` is the entry point.

Encoded once per content hash into `cache_dir()/HASH.ids.npy` (uint8, uint16 or uint32 ids), verified
against `HASH.meta.json` before it is trusted, written atomically. On a cache miss the files are read
fresh in one streaming pass that builds the vocabulary and writes the ids as it goes; training and
evaluation then read the ids through a memory map, so memory stays flat whatever the corpus size.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from charlm.atomic import atomic_path, write_json
from charlm.data.ids import IdWriter
from charlm.data.vocab import CharVocab, codepoints
from charlm.errors import CorpusError

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


def cache_dir() -> Path:
    """Where encoded corpora are cached (CHARLM_CACHE, default ~/.cache/charlm)."""
    return Path(os.environ.get("CHARLM_CACHE") or Path.home() / ".cache" / "charlm")


def id_view(ids: np.ndarray) -> torch.Tensor:
    """The ids as a tensor over the same memory (a memory map stays a map; nothing is copied): uint8 as it is,
    uint16 and uint32 read as int16 and int32, the same bits (ids stay below 2**15 and 2**31, `id_dtype`), so
    torch can compute with them."""
    signed = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32}.get(ids.dtype)
    if signed is not None:
        ids = ids.view(signed)
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


def _read_fresh(files: list[str], errors: str, h, bar=None, chunk_bytes: int = 1 << 22):
    """The corpus text in chunks, read from the files themselves (never through the `datasets` cache, which
    knows local files by path and mtime only), decoded as `datasets`' "text" loader decodes them (UTF-8,
    universal newlines). Every byte read also goes into the hash `h`, as `corpus_key` hashes it, and counts on
    the progress bar `bar`."""
    h.update(errors.encode())
    for f in files:
        dec = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(errors), translate=True)
        pos = 0
        with open(f, "rb") as fh:
            while True:
                data = fh.read(chunk_bytes)
                h.update(data)
                if bar is not None:
                    bar.update(len(data))
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


def read_corpus(data: Mapping) -> tuple[CharVocab, torch.Tensor]:
    """A data config (its `path`, `unit` and `errors`) -> the corpus's own vocabulary and its ids."""
    return encode_corpus(data.get("path"), data.get("errors", "strict"), data.get("unit", "char"))


def writable_cache(sub: str = "", prefix: str = "charlm-") -> Path:
    """cache_dir()/sub, made if missing, or a fresh temporary folder (named PREFIX...) when it cannot be
    written (a read-only home)."""
    folder = cache_dir() / sub
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix=prefix))
    return folder


def _read_bytes(files: list[str], h, bar=None, chunk_bytes: int = 1 << 22):
    """The files' bytes in chunks, each also fed to the hash `h` as `corpus_key` feeds it."""
    h.update(b"unit=byte")
    for f in files:
        with open(f, "rb") as fh:
            for data in iter(lambda: fh.read(chunk_bytes), b""):
                h.update(data)
                if bar is not None:
                    bar.update(len(data))
                yield data
        h.update(b"\0end-of-file\0")


LOCK_NAME = "encoding.lock"  # in the cache folder: held while a corpus is encoded


def _progress(files: list[str], where: str):
    """A bar counting the bytes encoded, for corpora of 64 MB and more (smaller ones take a second)."""
    from tqdm import tqdm

    total = sum(os.path.getsize(f) for f in files)
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"encoding {where}", disable=total < 1 << 26,
                leave=False, mininterval=1.0)


def _encode(files: list[str], key: str, unit: str, chunks, where: str) -> tuple[CharVocab, torch.Tensor]:
    """The vocabulary and memory-mapped ids of the cache entry `key`, encoded on a miss in one streaming pass:
    `chunks(h, bar)` yields the corpus's symbols (code points, or byte values) a chunk at a time, feeding the
    hash `h`, checked against `key` at the end (the files must not change meanwhile). The ids file is written
    atomically, then the vocabulary and the meta file (last)."""
    folder = writable_cache()
    ids_path, vocab_path, meta_path = (folder / f"{key}.{x}" for x in ("ids.npy", "vocab.json", "meta.json"))
    cached = _cached_ids(ids_path, vocab_path, meta_path, key)
    if cached is None or cached[0].unit != unit:
        with _encoding_lock(folder):  # DDP ranks started at once: one encodes, the others then map its entry
            cached = _cached_ids(ids_path, vocab_path, meta_path, key)
            if cached is None or cached[0].unit != unit:
                return _encode_into(ids_path, vocab_path, meta_path, files, key, unit, chunks, where)
    return cached[0], id_view(cached[1])


def _encode_into(ids_path: Path, vocab_path: Path, meta_path: Path, files: list[str], key: str, unit: str, chunks,
                 where: str) -> tuple[CharVocab, torch.Tensor]:
    """The streaming pass of `_encode`: ids written atomically, then the vocabulary, then the meta file."""
    h = hashlib.sha256()
    with atomic_path(ids_path, suffix=".npy") as tmp:
        writer = IdWriter(tmp, 256 if unit == "byte" else 0x110000)
        try:
            with _progress(files, where) as bar:
                for points in chunks(h, bar):
                    writer.append(points)
            if h.hexdigest()[:32] != key:
                raise CorpusError(f"{where}: changed while it was being read; run again")
            if writer.n == 0:
                raise CorpusError(f"{where}: empty")
            symbols = writer.finish()
        finally:
            writer.close()
    vocab = CharVocab([chr(p) for p in symbols], unit=unit)
    write_json(vocab_path, vocab.to_dict())
    write_json(meta_path, {"format": CACHE_FORMAT, "key": key, "n": writer.n, "dtype": vocab.id_dtype.name,
                           "vocab_size": len(vocab), **({"unit": "byte"} if unit == "byte" else {})})
    return vocab, id_view(np.load(ids_path, mmap_mode="r"))


@contextlib.contextmanager
def _encoding_lock(folder: Path):
    """One process at a time encodes into `folder` (`folder/encoding.lock`, an flock; none without fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: processes encoding at once each write their own copy, replaced atomically
        yield
        return
    with open(folder / LOCK_NAME, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def encode_corpus(path: str | None, errors: str = "strict", unit: str = "char") -> tuple[CharVocab, torch.Tensor]:
    """The corpus's own vocabulary and its ids, encoded once per content hash and memory-mapped after.

    `unit=char` reads UTF-8 text (universal newlines; `errors=replace` for invalid bytes), `unit=byte` the raw
    bytes. On a cache miss the files are read in one pass, a chunk at a time, the vocabulary growing as they
    go and the ids written as they come (`IdWriter`), so memory stays flat whatever the corpus size. The ids
    are stored compactly (`id_dtype`: uint8, uint16 or uint32) in `cache_dir()/HASH.ids.npy`, the vocabulary
    and a meta file (length, dtype) beside them. A cache entry whose ids do not match its meta is rebuilt.
    """
    if unit not in ("char", "byte"):
        raise CorpusError(f"data.unit={unit}: must be char or byte")
    files = resolve_files(path or embedded_corpus())
    where = path or "corpus"
    if unit == "byte":
        return _encode(files, corpus_key(files, "unit=byte"), unit,
                       lambda h, bar: (np.frombuffer(d, dtype=np.uint8) for d in _read_bytes(files, h, bar)), where)
    _check_readable(files, errors)
    return _encode(files, corpus_key(files, errors), unit,
                   lambda h, bar: (codepoints(text) for text in _read_fresh(files, errors, h, bar)), where)
