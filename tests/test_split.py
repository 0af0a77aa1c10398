"""The contiguous split: nanoGPT's counts to the character, and the published enwik8/text8 90M/5M/5M."""

import pytest

from charlm.data.split import split_bounds, split_slice


def test_tiny_shakespeare_matches_nanogpt():
    # nanoGPT's prepare.py: train = data[:int(n * 0.9)], val = the rest; n = 1,115,394
    train_end, val_end = split_bounds(1_115_394, 0.1)
    assert train_end == 1_003_854
    assert val_end - train_end == 111_540
    assert val_end == 1_115_394


def test_hundred_million_gives_90m_5m_5m():
    train_end, val_end = split_bounds(100_000_000, 0.05, 0.05)
    assert (train_end, val_end - train_end, 100_000_000 - val_end) == (90_000_000, 5_000_000, 5_000_000)


def test_slices_are_contiguous_and_cover_everything():
    n = 12_345
    parts = [split_slice(n, s, 0.07, 0.11) for s in ("train", "val", "test")]
    assert parts[0].start == 0 and parts[0].stop == parts[1].start and parts[1].stop == parts[2].start
    assert parts[2].stop == n
    assert split_slice(n, "all", 0.1) == slice(0, n)


def test_nothing_left_to_train_is_refused():
    with pytest.raises(ValueError, match="nothing to train"):
        split_bounds(100, 0.5, 0.5)
