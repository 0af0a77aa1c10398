"""The ids of a corpus on disk: a `.npy` file of uint8/uint16/uint32 ids written in one streaming pass
(`IdWriter`), widened when the vocabulary outgrows its dtype and relabelled in place to the sorted order."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from charlm.data.vocab import id_dtype

HEADER = 128  # bytes of the .npy header of a 1-D array: numpy pads it to 128, room for any length
CHUNK_IDS = 1 << 22  # ids read, relabelled or widened at a time


def _write_header(fh, dtype: np.dtype, n: int) -> None:
    """The `.npy` header of n ids of `dtype`, at the start of `fh` (HEADER bytes, whatever n)."""
    fh.seek(0)
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
    if fh.tell() != HEADER:
        raise RuntimeError(f".npy header of {fh.tell()} bytes, not {HEADER}")


def _map_ids(src, dst, dtype: np.dtype, fn) -> None:
    """The ids of `src` (of `dtype`, after the header) through `fn`, written to `dst` after its header, a
    chunk at a time; `dst` may be `src` when `fn` keeps the width (relabelling in place)."""
    pos_in = pos_out = HEADER
    while True:
        src.seek(pos_in)
        data = src.read(CHUNK_IDS * dtype.itemsize)
        if not data:
            return
        out = fn(np.frombuffer(data, dtype=dtype))
        dst.seek(pos_out)
        dst.write(out)
        pos_in, pos_out = pos_in + len(data), pos_out + out.nbytes


class IdWriter:
    """The ids of a corpus written into a `.npy` file while the corpus streams by, in one pass, with plain
    writes (the page cache holds them, not this process). A symbol (a code point, or a byte value) gets a
    provisional id when first seen; the file widens (`id_dtype`) when the symbols outgrow its dtype; `finish`
    relabels every id to its symbol's rank in the sorted vocabulary, in place, and writes the header."""

    def __init__(self, path: Path, n_points: int):
        self.path, self.n, self.dtype = path, 0, id_dtype(0)
        self.table = np.full(n_points, -1, dtype=np.int32)  # symbol -> provisional id (-1: not seen yet)
        self.symbols: list[int] = []                        # provisional id -> symbol
        self.fh = open(path, "w+b")
        _write_header(self.fh, self.dtype, 0)

    def append(self, points: np.ndarray) -> None:
        """The ids of `points` (code points, or byte values), after those written so far."""
        if not len(points):
            return
        ids = self.table[points]
        if ids.min() < 0:
            new = np.unique(points[ids < 0])
            self.table[new] = np.arange(len(self.symbols), len(self.symbols) + len(new))
            self.symbols += new.tolist()
            ids = self.table[points]
            if id_dtype(len(self.symbols)) != self.dtype:
                self._widen(id_dtype(len(self.symbols)))
        self.fh.seek(0, os.SEEK_END)
        self.fh.write(ids.astype(self.dtype))
        self.n += len(points)

    def _widen(self, dtype: np.dtype) -> None:
        """The ids so far rewritten in `dtype` (at most twice a corpus: past 256 and 32,768 symbols)."""
        wide = self.path.with_name(self.path.name + ".wide")
        try:
            with open(wide, "w+b") as dst:
                _write_header(dst, dtype, 0)
                _map_ids(self.fh, dst, self.dtype, lambda ids: ids.astype(dtype))
            os.replace(wide, self.path)
        finally:
            if wide.exists():
                wide.unlink()
        self.fh.close()
        self.fh, self.dtype = open(self.path, "r+b"), dtype

    def finish(self) -> list[int]:
        """Relabel the ids to the sorted symbols' order and write the header; the sorted symbols."""
        symbols = np.array(self.symbols, dtype=np.int64)
        rank = np.empty(len(symbols), dtype=self.dtype)
        rank[np.argsort(symbols)] = np.arange(len(symbols))
        if (rank != np.arange(len(symbols))).any():
            _map_ids(self.fh, self.fh, self.dtype, lambda ids: rank[ids])
        _write_header(self.fh, self.dtype, self.n)
        self.close()
        return sorted(self.symbols)

    def close(self) -> None:
        self.fh.close()
