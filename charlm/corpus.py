"""Corpora: local files (a file, a folder of text files, or a glob) -> a vocabulary and ids, as
characters (`unit=char`: UTF-8 text, universal newlines) or raw bytes (`unit=byte`: any file, nothing
decoded or translated; the enwik8 protocol). `read_corpus(data_config)` is the entry point.

Encoded once per content hash into `cache_dir()/HASH.ids.npy` (uint8, uint16 or int32 ids,
memory-mapped after), verified against `HASH.meta.json` before it is trusted, written atomically.
On a cache miss the files are read fresh, chunk by chunk (memory stays flat for large corpora).
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
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from charlm.atomic import atomic_path, write_json
from charlm.errors import CorpusError, UnknownCharError
from charlm.vocab import CharVocab

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


def read_corpus(data: Mapping) -> tuple[CharVocab, torch.Tensor]:
    """A data config (its `path`, `unit` and `errors`) -> the corpus's own vocabulary and its ids."""
    return encode_corpus(data.get("path"), data.get("errors", "strict"), data.get("unit", "char"))


def _cache_folder() -> Path:
    """cache_dir(), or a fresh temporary folder when it cannot be written (a read-only home)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="charlm-"))
    return folder


def _read_bytes(files: list[str], h, chunk_bytes: int = 1 << 24):
    """The files' bytes in chunks, each also fed to the hash `h` as `corpus_key` feeds it."""
    h.update(b"unit=byte")
    for f in files:
        with open(f, "rb") as fh:
            for data in iter(lambda: fh.read(chunk_bytes), b""):
                h.update(data)
                yield data
        h.update(b"\0end-of-file\0")


def _write_cache(ids_path: Path, vocab_path: Path, meta_path: Path, key: str, vocab: CharVocab, n: int, chunks,
                 h, changed: CorpusError, meta: dict) -> tuple[CharVocab, torch.Tensor]:
    """The second pass of an encoder: `chunks` of ids (reading them feeds the hash `h`) written into a memory-
    mapped `.npy` of n ids, checked against the first pass (length, content hash `key`), then the vocabulary
    and the meta file (last); each file atomically. The ids come back memory-mapped."""
    pos = 0
    with atomic_path(ids_path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=vocab.id_dtype, shape=(n,))
        for ids in chunks:
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
                           "vocab_size": len(vocab), **meta})
    return vocab, _torch_ids(np.load(ids_path, mmap_mode="r"))


def encode_bytes(path: str | None) -> tuple[CharVocab, torch.Tensor]:
    """The corpus as raw bytes: vocabulary = the byte values present (<= 256), uint8 ids, cached by content
    hash as characters are and memory-mapped after. Two passes of chunks (count, then map and write), so
    memory holds one chunk, not the corpus."""
    files = resolve_files(path or embedded_corpus())
    key = corpus_key(files, "unit=byte")
    folder = _cache_folder()
    ids_path, vocab_path, meta_path = (folder / f"{key}.{x}" for x in ("ids.npy", "vocab.json", "meta.json"))
    cached = _cached_ids(ids_path, vocab_path, meta_path, key)
    if cached is not None and cached[0].unit == "byte":
        return cached[0], _torch_ids(cached[1])
    where = path or "corpus"
    changed = CorpusError(f"{where}: changed while it was being read; run again")
    h, counts = hashlib.sha256(), np.zeros(256, dtype=np.int64)
    for data in _read_bytes(files, h):
        counts += np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    n = int(counts.sum())
    if h.hexdigest()[:32] != key:
        raise changed
    if n == 0:
        raise CorpusError(f"{where}: empty")
    present = np.flatnonzero(counts)
    vocab = CharVocab([chr(b) for b in present], unit="byte")
    table = np.zeros(256, dtype=np.uint8)  # byte value -> id
    table[present] = np.arange(len(present))
    h = hashlib.sha256()
    ids = (table[np.frombuffer(data, dtype=np.uint8)] for data in _read_bytes(files, h))
    return _write_cache(ids_path, vocab_path, meta_path, key, vocab, n, ids, h, changed, {"unit": "byte"})


def encode_corpus(path: str | None, errors: str = "strict", unit: str = "char") -> tuple[CharVocab, torch.Tensor]:
    """The corpus's own vocabulary and its ids, encoded once per content hash and memory-mapped after.
    `unit=byte` reads raw bytes (`encode_bytes`); the rest of this describes characters.

    On a cache miss the files are read fresh, twice, a chunk at a time (vocabulary and length, then ids
    written into a memory-mapped `.npy`), so memory stays flat whatever the corpus size. The ids are stored
    compactly (uint8, uint16 or int32 following the vocabulary size) in `cache_dir()/HASH.ids.npy`, with the
    vocabulary and a meta file (length, dtype) beside them; every file is written atomically, the meta last.
    A cache entry whose ids do not match its meta is rebuilt.
    """
    if unit == "byte":
        return encode_bytes(path)
    if unit != "char":
        raise CorpusError(f"data.unit={unit}: must be char or byte")
    files = resolve_files(path or embedded_corpus())
    _check_readable(files, errors)
    key = corpus_key(files, errors)
    folder = _cache_folder()
    ids_path, vocab_path = folder / f"{key}.ids.npy", folder / f"{key}.vocab.json"
    meta_path = folder / f"{key}.meta.json"
    cached = _cached_ids(ids_path, vocab_path, meta_path, key)
    if cached is not None and cached[0].unit == "char":
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

    def ids():
        for chunk in _read_fresh(files, errors, h):
            try:
                yield vocab.encode_array(chunk)
            except UnknownCharError:
                raise changed from None

    return _write_cache(ids_path, vocab_path, meta_path, key, vocab, n, ids(), h, changed, {})
