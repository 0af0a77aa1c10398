"""CharVocab: symbols <-> ids. Stored as plain data inside every checkpoint.

A vocabulary has a unit: `char` (Unicode code points, the default) or `byte` (raw byte values; symbol b
is held as the character chr(b), so ids, `stoi` and `chars` work the same in both units).
"""

from __future__ import annotations

import numpy as np

from charlm.errors import UnknownCharError
from charlm.schemas import UNITS  # noqa: F401  (one list, also checked in configs through charlm.schemas.RULES)

UNKNOWN_POLICIES = ("error", "skip")


def unit_label(unit: str) -> str:
    """How a bits-per-symbol figure reads in `unit`."""
    return "bits per byte" if unit == "byte" else "bits/char"


def id_dtype(n_symbols: int) -> np.dtype:
    """The compact dtype for the ids of `n_symbols` symbols: uint8 up to 256, uint16 up to 32,768, uint32 above.
    uint16 stops at 2**15 so that its ids read the same as int16, a type torch computes with (charlm.data.corpus)."""
    return np.dtype(np.uint8 if n_symbols <= 256 else np.uint16 if n_symbols <= 1 << 15 else np.uint32)


def codepoints(text: str) -> np.ndarray:
    """All code points of `text` as a uint32 array, without a Python loop."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


class CharVocab:
    """The sorted set of symbols a model knows; id i is the i-th symbol (a character, or a byte value)."""

    def __init__(self, chars: list[str] | str, unit: str = "char"):
        chars = sorted(set(chars))
        if not chars:
            raise ValueError("vocabulary is empty: the corpus has no characters")
        if unit not in UNITS:
            raise ValueError(f"unit={unit!r}: must be one of {UNITS}")
        if unit == "byte" and ord(chars[-1]) > 255:
            raise ValueError(f"a byte vocabulary holds byte values 0..255, not {chars[-1]!r}")
        self.chars, self.unit = chars, unit
        self.stoi = {c: i for i, c in enumerate(chars)}
        self._points = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, for searchsorted

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of every distinct character in `text`."""
        return cls([chr(p) for p in np.unique(codepoints(text))])

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars and self.unit == other.unit

    @property
    def unit_label(self) -> str:
        """How a bits-per-symbol figure reads in this vocabulary's unit."""
        return unit_label(self.unit)

    @property
    def id_dtype(self) -> np.dtype:
        """The dtype its ids are stored in (`id_dtype`)."""
        return id_dtype(len(self))

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of `text` outside the vocabulary, in sorted order."""
        points = np.unique(codepoints(text))
        missing = points[~np.isin(points, self._points)]
        return [chr(p) for p in missing]

    def encode_array(self, text: str, unknown: str = "error") -> np.ndarray:
        """Map characters to ids as a compact array; characters outside the vocabulary follow `unknown`."""
        if unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown={unknown!r}: must be one of {UNKNOWN_POLICIES}")
        points = codepoints(text)
        pos = np.searchsorted(self._points, points)
        pos_clipped = np.minimum(pos, len(self._points) - 1)
        known = self._points[pos_clipped] == points
        if not known.all():
            if unknown == "error":
                bad = "".join(self.unknown_chars(text))
                raise UnknownCharError(f"characters not in the vocabulary: {bad!r}")
            pos_clipped = pos_clipped[known]
        return pos_clipped.astype(self.id_dtype)

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """Map characters to ids; characters outside the vocabulary follow `unknown`."""
        return self.encode_array(text, unknown).tolist()

    def decode(self, ids) -> str:
        """Map ids back to text (byte unit: one character chr(b) per byte; `to_bytes` gives the bytes)."""
        return "".join(self.chars[int(i)] for i in ids)

    def text_ids(self, text: str, unknown: str = "error") -> list[int]:
        """Ids of text a user typed (a prompt): its characters, or in byte unit its UTF-8 bytes."""
        if self.unit == "byte":
            text = text.encode("utf-8").decode("latin-1")  # one character per byte
        return self.encode(text, unknown)

    @staticmethod
    def to_bytes(symbols: str) -> bytes:
        """A byte-unit `decode` result as the bytes it stands for."""
        return symbols.encode("latin-1")

    def to_dict(self) -> dict:
        """Plain data for a checkpoint (loads with `weights_only=True`)."""
        return {"chars": "".join(self.chars), "unit": self.unit}

    @classmethod
    def from_dict(cls, d: dict) -> CharVocab:
        """The vocabulary of `to_dict` (checkpoints written before units existed are char unit)."""
        return cls(list(d["chars"]), d.get("unit", "char"))
