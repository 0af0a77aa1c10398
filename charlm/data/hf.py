"""Hugging Face datasets as corpora: a hub dataset (`data=hf data.dataset=NAME`) or a local one
(`data=hf data.path=...`: a `save_to_disk` folder, or parquet / JSON / CSV / text files).

The text column's rows are joined with one newline between rows and written, as UTF-8, into one text
file in the corpus cache (`cache_dir()/hf/HASH.txt`, named by its content). From there it is a corpus like
any other (charlm.data.corpus: encoded once per content hash, its own vocabulary), so the same text read as a
plain file gives the same ids. Line ends are read as text files are read: "\\r\\n" and "\\r" become "\\n".

Splits: by default the dataset's `train` split is joined and cut by charlm (`charlm.data.split`). With
`data.hf_splits` ({train: train, val: validation, test: test}) each of charlm's splits is that split's
text, written one after another into the same file (one vocabulary for all), and charlm does not cut again.
`data.max_chars=N` keeps the first N characters of the joined train text, streaming the rows when the
dataset lives on the hub, so a large dataset can be tried without downloading all of it.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import io
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from charlm.data.corpus import writable_cache
from charlm.data.datamodule import CharDataModule
from charlm.data.vocab import CharVocab
from charlm.errors import ConfigError, CorpusError

DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what `save_to_disk` writes
CHARLM_SPLITS = ("train", "val", "test")
TEXT_DTYPES = ("string", "large_string")


@dataclass(frozen=True)
class HFText:
    """The joined text of a dataset, written to `path`; `lengths` holds each charlm split written, in file
    order, as (characters, UTF-8 bytes); `own_splits` when the dataset's splits are charlm's."""

    path: str
    lengths: dict[str, tuple[int, int]]
    own_splits: bool

    def splits(self, unit: str = "char") -> dict[str, slice] | None:
        """Where each of charlm's splits lies in the file's ids (characters, or bytes for `unit=byte`), and
        'all'; None when charlm cuts the text itself."""
        if not self.own_splits:
            return None
        k = 1 if unit == "byte" else 0
        out, pos = {}, 0
        for split in CHARLM_SPLITS:
            n = self.lengths.get(split, (0, 0))[k]
            out[split] = slice(pos, pos + n)
            pos += n
        out["all"] = slice(0, pos)
        return out


def is_hf(data_cfg: Mapping) -> bool:
    """Whether a data config reads a Hugging Face dataset (data=hf)."""
    return str(data_cfg.get("_target_", "")).startswith("charlm.data.hf.")


def check_source(dataset: str | None, path: str | None, hf_splits: Mapping | None) -> dict[str, str] | None:
    """What a config must say: a hub name or a local path (one of them), and a split map onto train and val
    (test optional). Returns the split map as a plain dict."""
    if bool(dataset) == bool(path):
        raise ConfigError("data=hf: set data.dataset=NAME (a hub dataset) or data.path=DIR_OR_FILES, one of them")
    if hf_splits is None:
        return None
    if not isinstance(hf_splits, Mapping):
        raise ConfigError(f"data.hf_splits={hf_splits}: must map charlm's splits onto the dataset's, "
                          "e.g. {train: train, val: validation, test: test}")
    splits = {str(k): v for k, v in hf_splits.items()}
    unknown = [k for k in splits if k not in CHARLM_SPLITS]
    if unknown or not {"train", "val"} <= set(splits):
        raise ConfigError(f"data.hf_splits={splits}: keys must be train and val (and test, optionally)")
    for k, v in splits.items():
        if not isinstance(v, str) or not v:
            raise ConfigError(f"data.hf_splits.{k}={v}: must be a split name of the dataset")
    return splits


# ---- loading ------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_hub(name: str, config: str | None, revision: str | None, streaming: bool):
    """All splits of a hub dataset (streamed: nothing downloaded beyond the rows read)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    offline = bool(datasets.config.HF_HUB_OFFLINE)
    try:
        return datasets.load_dataset(name, config, revision=revision, streaming=streaming and not offline)
    except (ConnectionError, FileNotFoundError) as e:
        if offline:
            raise CorpusError(f"data.dataset={name}: not in the local datasets cache, and HF_HUB_OFFLINE=1 keeps "
                              "the hub out of reach (load it once online, or set data.path to a local copy)") from None
        if isinstance(e, DatasetNotFoundError):
            raise CorpusError(f"data.dataset={name}: no such dataset on the Hugging Face hub "
                              "(or a gated one: log in with `hf auth login`)") from None
        raise CorpusError(f"data.dataset={name}: could not load it ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - a wrong config name, revision...: the library's own first line
        raise CorpusError(f"data.dataset={name}: {_first_line(e)}") from None


def _load_local(path: str, streaming: bool):
    """All splits of a local dataset: a `save_to_disk` folder, a folder of data files, or data files."""
    import datasets

    p = Path(os.path.expanduser(path))
    try:
        if p.is_dir() and any((p / m).is_file() for m in SAVED_MARKERS):
            return datasets.load_from_disk(str(p))
        if p.is_dir():
            return datasets.load_dataset(str(p), streaming=streaming)
        files = [str(p)] if p.is_file() else sorted(glob.glob(os.path.expanduser(path), recursive=True))
        if not files:
            raise CorpusError(f"data.path={path}: no such file, folder or glob match")
        kinds = {DATA_FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) > 1:
            raise CorpusError(f"data.path={path}: expected a saved dataset folder, or files of one kind among "
                              f"{', '.join(DATA_FILE_BUILDERS)}")
        return datasets.load_dataset(kinds.pop(), data_files=files, streaming=streaming)
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable files: the library's own first line, naming them
        raise CorpusError(f"data.path={path}: {_first_line(e)}") from None


def load_splits(dataset: str | None, config: str | None, revision: str | None, path: str | None,
                streaming: bool) -> Mapping[str, Any]:
    """Split name -> Dataset (or IterableDataset when streamed); a single saved Dataset is 'train'."""
    ds = _load_hub(dataset, config, revision, streaming) if dataset else _load_local(path, streaming)
    return ds if isinstance(ds, Mapping) else {"train": ds}


# ---- rows -> text -------------------------------------------------------------------------------


def rows(ds, column: str, where: str) -> Iterator[str]:
    """The text column's rows (missing values skipped); a wrong or non-text column is a CorpusError."""
    features = ds.features
    if features is not None:
        if column not in features:
            raise CorpusError(f"{where}: no column {column!r} (columns: {', '.join(features)}); set data.column")
        dtype = getattr(features[column], "dtype", type(features[column]).__name__)
        if dtype not in TEXT_DTYPES:
            texts = [c for c, f in features.items() if getattr(f, "dtype", None) in TEXT_DTYPES]
            raise CorpusError(f"{where}: column {column!r} holds {dtype}, not text "
                              f"(text columns: {', '.join(texts) or 'none'})")
        ds = ds.select_columns([column])  # other columns are never read
    for batch in ds.iter(batch_size=1000):
        if column not in batch:
            raise CorpusError(f"{where}: no column {column!r} (columns: {', '.join(batch)}); set data.column")
        for value in batch[column]:
            if value is None:
                continue
            if not isinstance(value, str):
                raise CorpusError(f"{where}: column {column!r} holds {type(value).__name__}, not text")
            yield value


def joined(texts: Iterator[str], max_chars: int | None = None) -> Iterator[str]:
    """The rows joined with one newline between rows, line ends as text files read them ("\\r\\n", "\\r"
    -> "\\n"), stopping after the first `max_chars` characters."""
    newlines = io.IncrementalNewlineDecoder(None, translate=True)
    left = max_chars if max_chars is not None else -1

    def emit(piece: str, final: bool = False):
        nonlocal left
        out = newlines.decode(piece, final=final)
        if left >= 0:
            out, left = out[:left], left - min(left, len(out))
        return out

    first = True
    for text in texts:
        out = emit(text if first else "\n" + text)
        first = False
        if out:
            yield out
        if left == 0:
            return
    tail = emit("", final=True)
    if tail:
        yield tail


def write_text(parts: list[tuple[str, Iterator[str]]], where: str, own_splits: bool) -> HFText:
    """Write each (charlm split, text pieces) one after another into one UTF-8 file named by its content
    hash; an empty train split is a CorpusError and leaves nothing behind."""
    folder = writable_cache("hf", prefix="charlm-hf-")
    fd, tmp = tempfile.mkstemp(prefix=".hf.", suffix=".txt", dir=folder)
    lengths: dict[str, tuple[int, int]] = {}
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for split, pieces in parts:
                chars = nbytes = 0
                for piece in pieces:
                    data = piece.encode("utf-8")
                    f.write(data)
                    h.update(data)
                    chars, nbytes = chars + len(piece), nbytes + len(data)
                lengths[split] = (chars, nbytes)
                if chars == 0 and split == "train":
                    raise CorpusError(f"{where}: empty (no text in column rows)")
        final = folder / f"{h.hexdigest()[:32]}.txt"
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return HFText(str(final), lengths, own_splits)


def hf_text(dataset: str | None = None, config: str | None = None, revision: str | None = None,
            path: str | None = None, column: str = "text", hf_splits: Mapping | None = None,
            max_chars: int | None = None, verbose: bool = True) -> HFText:
    """Load the dataset, join its text column's rows and write the corpus file; prints the split rule used."""
    split_map = check_source(dataset, path, hf_splits)
    where = f"data.dataset={dataset}" if dataset else f"data.path={path}"
    streaming = max_chars is not None and bool(dataset)  # local files are read where they lie anyway
    splits = load_splits(dataset, config, revision, path, streaming)
    wanted = split_map or {"train": "train"}
    for theirs in wanted.values():
        if theirs not in splits:
            raise CorpusError(f"{where}: no split {theirs!r} (splits: {', '.join(splits)}); set data.hf_splits")
    parts = [(ours, joined(rows(splits[theirs], column, where), max_chars if ours == "train" else None))
             for ours, theirs in sorted(wanted.items(), key=lambda kv: CHARLM_SPLITS.index(kv[0]))]
    text = write_text(parts, where, own_splits=split_map is not None)
    if verbose:
        print(describe(text, where, column, split_map, max_chars))
    return text


def describe(text: HFText, where: str, column: str, split_map: dict | None, max_chars: int | None) -> str:
    """One line: where the text came from and which split rule applies."""
    cap = f", first {max_chars:,} train chars" if max_chars else ""
    if split_map is None:
        return f"hf: {where}, column {column}{cap}: its train split ({text.lengths['train'][0]:,} chars), cut by charlm"
    own = ", ".join(f"{k}={v} ({text.lengths[k][0]:,} chars)" for k, v in split_map.items())
    return f"hf: {where}, column {column}{cap}: the dataset's own splits, {own}"


def corpus_source(data_cfg: Mapping) -> tuple[str | None, dict[str, slice] | None]:
    """(the corpus path, the dataset's own split positions or None) for any data config: a text corpus's
    `data.path`, or a Hugging Face dataset's joined text (charlm.evaluate reads a corpus through this)."""
    if not is_hf(data_cfg):
        return data_cfg.get("path"), None
    text = hf_text(data_cfg.get("dataset"), data_cfg.get("config"), data_cfg.get("revision"), data_cfg.get("path"),
                   data_cfg.get("column", "text"), data_cfg.get("hf_splits"), data_cfg.get("max_chars"))
    return text.path, text.splits(data_cfg.get("unit", "char"))


# ---- the data module ----------------------------------------------------------------------------


class HFDataModule(CharDataModule):
    """CharDataModule over a Hugging Face dataset's text. Takes its own keys and every CharDataModule key
    (block_size, sampling, val_fraction, ...); the data group is typed from both signatures."""

    def __init__(self, dataset: Optional[str] = None, config: Optional[str] = None, revision: Optional[str] = None,
                 path: Optional[str] = None, column: str = "text", hf_splits: Optional[dict] = None,
                 max_chars: Optional[int] = None, name: Optional[str] = None, **kwargs):
        self.hf = {"dataset": dataset, "config": config, "revision": revision, "path": path, "column": column,
                   "hf_splits": hf_splits, "max_chars": max_chars}
        check_source(dataset, path, hf_splits)
        super().__init__(path=None, name=name or dataset or path, **kwargs)

    def read_corpus(self, path: str | None = None) -> tuple[CharVocab, torch.Tensor, dict[str, slice] | None]:
        text = hf_text(**self.hf)
        vocab, ids, _ = super().read_corpus(text.path)
        return vocab, ids, text.splits(getattr(self, "unit", "char"))


def _typed_like_parent(cls: type) -> type:
    """Give `cls.__init__` the signature and annotations of its own keys followed by its parent's, so the
    config checker (charlm.config.target_schema) types every key, present and future, of both."""
    own = inspect.signature(cls.__init__)
    parent = inspect.signature(cls.__mro__[1].__init__)
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [p.replace(kind=p.KEYWORD_ONLY) for n, p in parent.parameters.items()
               if n not in own.parameters and n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    cls.__init__.__signature__ = own.replace(parameters=params)
    cls.__init__.__annotations__ = {**cls.__mro__[1].__init__.__annotations__, **cls.__init__.__annotations__}
    return cls


_typed_like_parent(HFDataModule)
