"""The one contiguous train / val / test cut, used by training, `evaluate` and everything that scores.

Train comes first, then val, then test. The train boundary is `int(n * train_fraction)` with
`train_fraction = 1 - val_fraction - test_fraction`, the val/test boundary `int(n * (train_fraction +
val_fraction))`, both in exact decimal arithmetic: in float64 `1 - 0.05 - 0.05` is 0.8999999999999999,
which would give a 100,000,000-symbol file 89,999,999 training symbols instead of the published 90M.
With val_fraction 0.1 this is nanoGPT's `prepare.py` to the character (tiny shakespeare: 1,003,854 /
111,540).
"""

from __future__ import annotations

from fractions import Fraction

SPLITS = ("train", "val", "test")


def _exact(x: float) -> Fraction:
    """The decimal a user typed (0.1 is 1/10, not float64's 0.1000000000000000055...)."""
    return Fraction(str(x))


def split_bounds(n: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, int]:
    """(end of train, end of val) for a corpus of `n` symbols; test is the rest."""
    val, test = _exact(val_fraction), _exact(test_fraction)
    train = 1 - val - test
    if train <= 0:
        raise ValueError(f"val_fraction {val_fraction} + test_fraction {test_fraction} leaves nothing to train on")
    train_end = int(n * train)                # Fraction * int, floored exactly
    val_end = int(n * (train + val))
    return train_end, val_end


def split_slice(n: int, split: str, val_fraction: float, test_fraction: float = 0.0) -> slice:
    """The positions of `split` ('train', 'val', 'test' or 'all') in a corpus of `n` symbols."""
    if split == "all":
        return slice(0, n)
    train_end, val_end = split_bounds(n, val_fraction, test_fraction)
    return {"train": slice(0, train_end), "val": slice(train_end, val_end), "test": slice(val_end, n)}[split]
