"""A data source charlm has never heard of: one column of a CSV file, its rows joined by newlines.

The read_corpus style (charlm/data/__init__.py): turn the source into one UTF-8 text file in the corpus
cache, named by its content, and hand that file to CharDataModule.read_corpus, which encodes, caches,
builds the vocabulary and leaves splitting, batching and the yardstick to charlm.
"""

from __future__ import annotations

import csv
import hashlib

from charlm.data.corpus import cache_dir
from charlm.data.datamodule import CharDataModule
from charlm.errors import CorpusError


class CSVColumn(CharDataModule):
    """The text of one CSV column (`data.column`) as a corpus."""

    def __init__(self, column: str = "text", **kwargs):
        super().__init__(**kwargs)
        self.column = column

    def read_corpus(self, path: str | None = None):
        path = path or self.path
        with open(path, newline="", encoding="utf-8") as fh:
            rows = csv.DictReader(fh)
            if self.column not in (rows.fieldnames or []):
                raise CorpusError(f"{path}: no column {self.column!r} (data.column); it has {rows.fieldnames}")
            text = "\n".join(row[self.column] for row in rows)
        out = cache_dir() / "csv" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8", newline="")
        return super().read_corpus(str(out))
