import torch

from charlm.data import CharDataModule, EvalBatches, RandomWindows, Streams, embedded_corpus


def test_embedded_corpus_split_is_nanogpt():
    dm = CharDataModule(block_size=8, batch_size=4)
    dm.setup()
    n = sum(len(s) for s in dm.splits.values())
    assert n == 1_115_394 and len(dm.vocab) == 65
    assert len(dm.splits["val"]) == int(n * 0.1) and len(dm.splits["train"]) == n - int(n * 0.1)
    with open(embedded_corpus(), encoding="utf-8") as f:
        text = f.read()
    assert dm.vocab.decode(dm.splits["val"][:50].tolist()) == text[n - len(dm.splits["val"]) :][:50]


def test_eval_batches_cover_the_split_once():
    ids = torch.arange(103)
    ds = EvalBatches(ids, block_size=10, batch_size=4)
    targets = torch.cat([y.flatten() for _, y in (ds[i] for i in range(len(ds)))])
    assert torch.equal(targets, ids[1:])  # every next-char target exactly once, in order


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
