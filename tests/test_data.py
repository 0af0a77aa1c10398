import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm.data.corpus import embedded_corpus, encode_corpus
from charlm.data.datamodule import CharDataModule, RandomWindows, Streams
from charlm.yardstick import IGNORE, SlidingWindows


def test_embedded_corpus_split_is_nanogpt():
    dm = CharDataModule(block_size=8, batch_size=4)
    dm.setup()
    n = sum(len(s) for s in dm.splits.values())
    assert n == 1_115_394 and len(dm.vocab) == 65
    # nanoGPT's prepare.py: train = data[:int(n * 0.9)], val the rest
    assert len(dm.splits["train"]) == 1_003_854 and len(dm.splits["val"]) == 111_540
    with open(embedded_corpus(), encoding="utf-8") as f:
        text = f.read()
    assert dm.vocab.decode(dm.splits["val"][:50].tolist()) == text[n - len(dm.splits["val"]) :][:50]


def test_eval_batches_cover_the_split_once():
    ids = torch.arange(103)
    ds = SlidingWindows(ids, window=10, stride=10, batch_size=4)  # EvalBatches moved to charlm.yardstick
    targets = torch.cat([y.flatten() for _, y, _ in (ds[i] for i in range(len(ds)))])
    assert torch.equal(targets[targets != IGNORE], ids[1:])  # every next-char target exactly once, in order


def test_random_windows_depend_only_on_step():
    ids = torch.arange(1000)
    a = iter(RandomWindows(ids, 8, 4, seed=1))
    batches = [next(a) for _ in range(5)]
    resumed = next(iter(RandomWindows(ids, 8, 4, seed=1, start=3)))
    assert torch.equal(resumed[0], batches[3][0])
    assert not torch.equal(batches[0][0], batches[1][0])


def test_streams_are_contiguous_across_batches():
    ids = torch.arange(1001)
    it = iter(Streams(ids, block_size=10, batch_size=4))
    _, y1, r1 = next(it)
    x2, _, r2 = next(it)
    assert bool(r1) and not bool(r2)
    assert torch.equal(x2[:, 0], y1[:, -1])  # row b of batch 2 continues row b of batch 1


def _cache_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "encoding.lock")  # the lock stays, empty


def test_cache_reads_a_file_changed_with_its_mtime_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "corpus.txt"
    f.write_text("hello world\n" * 50)
    st = os.stat(f)
    vocab, ids = encode_corpus(str(f))
    assert vocab.decode(ids.tolist()) == "hello world\n" * 50
    f.write_text("jello wormy\n" * 50)  # same size; then the old mtime back, as `cp -p` or `rsync -a` leave it
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    vocab, ids = encode_corpus(str(f))
    assert vocab.decode(ids.tolist()) == "jello wormy\n" * 50
    names = _cache_files(tmp_path / "cache")  # two entries, three files each, no temporary file left behind
    assert len(names) == 6 and all(n.endswith((".ids.npy", ".vocab.json", ".meta.json")) for n in names)


def _truncate(p: Path, ids: np.ndarray) -> None:
    p.write_bytes(p.read_bytes()[: -len(ids) // 2])


def _shorter(p: Path, ids: np.ndarray) -> None:
    np.save(p, ids[:-5])  # a valid .npy, the right dtype, the wrong length


def _wider(p: Path, ids: np.ndarray) -> None:
    np.save(p, ids.astype(np.int64))  # the right length, the wrong dtype


def _garbage(p: Path, ids: np.ndarray) -> None:
    p.write_bytes(b"not an npy file")


@pytest.mark.parametrize("damage", [_truncate, _shorter, _wider, _garbage])
def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("CHARLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "corpus.txt"
    text = "the quick brown fox jumps over the lazy dog\n" * 40
    f.write_text(text)
    encode_corpus(str(f))
    (ids_file,) = (tmp_path / "cache").glob("*.ids.npy")
    good = np.load(ids_file).copy()
    damage(ids_file, good)
    vocab, ids = encode_corpus(str(f))
    assert vocab.decode(ids.tolist()) == text
    rebuilt = np.load(ids_file)
    assert rebuilt.dtype == np.uint8 and np.array_equal(rebuilt, good)


def test_more_than_256_chars_are_stored_as_uint16(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "hanzi.txt"
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3 + "\n"
    f.write_text(text, encoding="utf-8")
    vocab, ids = encode_corpus(str(f))
    assert len(vocab) == 301 and ids.dtype == torch.int16  # the same bits, a type torch computes with
    assert vocab.decode(ids.tolist()) == text
    (ids_file,) = (tmp_path / "cache").glob("*.ids.npy")
    (meta_file,) = (tmp_path / "cache").glob("*.meta.json")
    assert np.load(ids_file).dtype == np.uint16
    assert json.loads(meta_file.read_text())["dtype"] == "uint16"
    vocab2, ids2 = encode_corpus(str(f))  # a cache hit gives the same
    assert vocab2 == vocab and torch.equal(ids2, ids)


def test_training_batches_draw_nothing_from_the_global_rng():
    """What Lightning iterates for training is the batches themselves (no DataLoader), seeded by their own
    generator: starting and drawing from it leaves torch's global RNG where it was (exact resume)."""
    dm = CharDataModule(block_size=8, batch_size=4, sampling="random")
    dm.prepare()
    before = torch.get_rng_state()
    batches = dm.train_dataloader()
    x, y, reset = next(iter(batches))
    assert torch.equal(torch.get_rng_state(), before)
    assert x.shape == y.shape == (4, 8) and reset is True
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one character


def test_batches_move_only_when_the_run_is_not_on_the_cpu():
    dm = CharDataModule(block_size=8, batch_size=4, sampling="random")
    dm.prepare()
    batch = next(iter(dm.train_dataloader()))
    assert dm.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch  # made on the CPU: nothing to do
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)  # any other device: Lightning's move
    assert moved.x.device.type == moved.y.device.type == "meta" and moved.reset is True
