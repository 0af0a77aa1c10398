"""Data: from a corpus (a file, a folder, the embedded text, a Hugging Face dataset) to ids, splits and batches.

`corpus` encodes a corpus once, streaming, into a cache of ids read memory-mapped; `vocab` maps symbols
(code points or bytes) to ids; `split` cuts train/val/test exactly; `datamodule` serves random windows or
streams to Lightning; `hf` reads Hugging Face datasets.

The contract of a data source (as `charlm.models.contract` is a model's). A data source is a subclass of
`charlm.data.datamodule.CharDataModule`, named by `_target_` in a YAML of the `data` group; `charlm.training.build`
calls it with the YAML's keys (type-checked against the constructor's hints: they are its config schema) plus
`vocab` (a checkpoint's, on resume, else None) and `seed`, then calls `prepare()`. After `prepare()` it must hold:

- `vocab`: a `CharVocab`, the given one when one was given (a corpus symbol it lacks is refused in one line);
- `splits`: {"train", "val", "test"} -> 1-D integer id tensors ("test" may be empty), train, val and a
  non-empty test each at least one window long (`block_size` + 1); the yardstick scores val and test from these;
- `prepare()` idempotent (it returns at once when `splits` is set) and deterministic in `seed`.

Everything else (random windows or streams with batch k a function of (seed, k), exact resume, the
yardstick's passes, DDP ranks) the base class gives. Two styles, one per kind of source:

- a text, from anywhere (a file format, a database, an API): override `read_corpus(path)` only. Turn the
  source into one UTF-8 text file in the corpus cache, named by its content, and return
  `super().read_corpus(that_file)`; encoding, caching, `data.unit`, `data.errors`, the vocabulary check and
  the split come from charlm. Return a third value (split name -> slice of the ids) when the source brings its
  own splits. `hf.HFDataModule` is this style; so is the worked example in docs/architecture.md.
  Use this style whenever the data is a text.
- a generated task (the stream is made, not read): override `prepare()` to set `vocab` and `splits` as above,
  and `train_dataset(start)` when training draws fresh data (an iterable of `charlm.yardstick.Batch`, batch k a
  function of (seed, k), starting at batch `start`); `callbacks()` adds the task's metrics.
  `charlm.studies.recall.RecallDataModule` is this style.
"""
from __future__ import annotations

import importlib


def __getattr__(name: str):
    """`charlm.data.CharDataModule` (the path before the data package existed), imported on first use."""
    if name in ("CharDataModule",):
        return getattr(importlib.import_module("charlm.data.datamodule"), name)
    raise AttributeError(f"module 'charlm.data' has no attribute {name!r}")
