"""Data: from a corpus (a file, a folder, the embedded text, a Hugging Face dataset) to ids, splits and batches.

`corpus` encodes a corpus once, streaming, into a cache of ids read memory-mapped; `vocab` maps symbols
(code points or bytes) to ids; `split` cuts train/val/test exactly; `datamodule` serves random windows or
streams to Lightning; `hf` reads Hugging Face datasets. How to add a data source: docs/architecture.md.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    """`charlm.data.CharDataModule` (the path before the data package existed), imported on first use."""
    if name in ("CharDataModule",):
        return getattr(importlib.import_module("charlm.data.datamodule"), name)
    raise AttributeError(f"module 'charlm.data' has no attribute {name!r}")
