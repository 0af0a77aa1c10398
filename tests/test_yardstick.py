"""The yardstick: every character scored once, with all the context the model can use; end-of-run figures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, run_cli, run_main
from torch import nn

from charlm.data.datamodule import RandomWindows, Streams
from charlm.yardstick import IGNORE, EvalStreams, SlidingWindows, eval_dataset, score

V = 5


class Bigram(nn.Module):
    """logits_t = table[x_t]: a model whose loss can be computed by hand. Its state is unused."""

    def __init__(self, table: torch.Tensor, context_size: int | None = None):
        super().__init__()
        self.table = nn.Parameter(table)
        self.context_size = context_size

    def forward(self, idx, state=None):
        return self.table[idx], torch.zeros(())  # (B, T, V)


def hand_loss(ids: list[int], table: torch.Tensor) -> float:
    """Mean over the len-1 targets of -log p(next | current), one character at a time."""
    logp = torch.log_softmax(table.double(), -1)
    return -sum(float(logp[a, b]) for a, b in zip(ids[:-1], ids[1:])) / (len(ids) - 1)


@pytest.fixture
def corpus():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (1003,), generator=g)
    table = torch.randn(V, V, generator=g)
    return ids, table


@pytest.mark.parametrize("streams,chunk", [(1, 64), (3, 64), (8, 50), (7, 1000)])
def test_streams_equal_the_hand_computed_loss(corpus, streams, chunk):
    ids, table = corpus
    total, count = score(Bigram(table), EvalStreams(ids, chunk, streams))
    assert count == len(ids) - 1
    assert math.isclose(total / count, hand_loss(ids.tolist(), table), rel_tol=1e-6)


@pytest.mark.parametrize("window,stride,batch", [(16, 8, 4), (16, 16, 3), (10, 3, 64), (32, 5, 1)])
def test_sliding_window_equals_the_hand_computed_loss(corpus, window, stride, batch):
    ids, table = corpus
    total, count = score(Bigram(table, window), SlidingWindows(ids, window, stride, batch))
    assert count == len(ids) - 1
    assert math.isclose(total / count, hand_loss(ids.tolist(), table), rel_tol=1e-6)


def scored_targets(ds) -> list[tuple[int, int]]:
    """(input id, target id) of every scored position, over a dataset of Batch items."""
    pairs = []
    for i in range(len(ds)):
        x, y, _ = ds[i]
        keep = y != IGNORE
        pairs += list(zip(x[keep].tolist(), y[keep].tolist()))
    return pairs


@pytest.mark.parametrize("n", [2, 17, 100, 257])
def test_stream_pass_scores_every_character_once_left_to_right(n):
    ids = torch.arange(n)  # distinct ids: a target names its position
    ds = EvalStreams(ids, 16, 4)
    pairs = scored_targets(ds)
    assert sorted(t for _, t in pairs) == list(range(1, n))  # every target once, the last chunk's too
    assert all(t == x + 1 for x, t in pairs)                 # each scored from the character before it
    assert [ds[i].reset for i in range(len(ds))] == [True] + [False] * (len(ds) - 1)  # one cold start per stream
    for i in range(1, len(ds)):  # chunk i continues chunk i-1 row by row: the carried state is the right one
        assert torch.equal(ds[i].x[:, 0][ds[i].y[:, 0] != IGNORE], ds[i - 1].y[:, -1][ds[i].y[:, 0] != IGNORE])


@pytest.mark.parametrize("n,window,stride", [(100, 16, 8), (50, 16, 5), (17, 16, 8), (300, 32, 32)])
def test_sliding_window_scores_every_character_once_with_context(n, window, stride):
    ids = torch.arange(n)
    ds = SlidingWindows(ids, window, stride, batch_size=3)
    pairs = scored_targets(ds)
    assert sorted(t for _, t in pairs) == list(range(1, n))
    for i in range(len(ds)):
        x, y, reset = ds[i]
        assert reset  # every window from an empty state
        for row_x, row_y in zip(x, y):
            cols = (row_y != IGNORE).nonzero().flatten().tolist()
            if row_x[0] != 0:  # not the first window: at least window - stride characters of context
                assert min(cols) >= window - stride


def test_streams_are_split_between_ranks():
    ids = torch.arange(2000)
    whole = next(iter(Streams(ids, 16, 8, world=1)))
    halves = [next(iter(Streams(ids, 16, 4, rank=r, world=2))) for r in (0, 1)]
    assert torch.equal(torch.cat([h.x for h in halves]), whole.x)  # rank r trains its own slice of the streams
    assert not torch.equal(halves[0].x, halves[1].x)
    val = [EvalStreams(ids, 16, 8, rank=r, world=2) for r in (0, 1)]
    got = sorted(t for ds in val for _, t in scored_targets(ds))
    assert got == list(range(1, 2000))  # the ranks' val shares cover every character once


def test_random_windows_differ_between_ranks():
    ids = torch.arange(5000)
    a = next(iter(RandomWindows(ids, 16, 8, seed=1 + 7919 * 0)))
    b = next(iter(RandomWindows(ids, 16, 8, seed=1 + 7919 * 1)))
    assert not torch.equal(a.x, b.x)


def test_window_dataset_for_a_windowed_model_and_streams_for_the_rest():
    ids = torch.arange(200)
    assert isinstance(eval_dataset(ids, None, 4, 32, None, 8), EvalStreams)
    ds = eval_dataset(ids, 32, 4, 32, None, 8)
    assert isinstance(ds, SlidingWindows) and ds.x.shape[1] == 32
    assert (ds.y[1] != IGNORE).sum() == 16  # default stride: half the window


def test_many_streams_agree_with_one_stream(trained_run):
    from charlm.checkpoint import load_model
    from charlm.data.datamodule import CharDataModule

    results = json.loads((trained_run / "results.json").read_text())
    model, vocab, _ = load_model(results["best_ckpt"])
    dm = CharDataModule(vocab=vocab)
    dm.prepare()
    one = score(model, EvalStreams(dm.splits["val"], 256, 1))
    eight = score(model, EvalStreams(dm.splits["val"], 256, 8))
    assert one[1] == eight[1] == len(dm.splits["val"]) - 1
    assert abs(one[0] / one[1] - eight[0] / eight[1]) < 0.005


def test_run_shorter_than_one_interval_still_validates_and_writes_strict_json(tmp_path):
    args = [a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    run_cli("charlm.train", *args, "trainer.max_steps=5", "trainer.val_check_interval=1000",
            f"hydra.run.dir={tmp_path}")

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert results["best_step"] == 5 and results["steps"] == 5
    assert math.isfinite(results["best_val_loss"]) and results["protocol"]["kind"] == "streams"
    assert math.isclose(results["best_val_bpc"], results["best_val_loss"] / math.log(2))
    assert results["window_val_loss"] is not None


def test_evaluate_reproduces_the_figure_training_wrote(trained_run, tmp_path):
    results = json.loads((trained_run / "results.json").read_text())
    out = tmp_path / "ev.json"
    run_cli("charlm.evaluate", f"ckpt_path={results['best_ckpt']}", "eval.chunk=512", "eval.window_batches=2",
            f"json={out}")
    ev = json.loads(out.read_text())
    assert math.isclose(ev["loss"], results["best_val_loss"], rel_tol=1e-6)
    assert ev["chars_scored"] == results["protocol"]["chars_scored"]
    assert math.isclose(ev["window_loss"], results["window_val_loss"], rel_tol=1e-6)


def test_evaluate_unknown_characters(trained_run, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("ROMEO: é\n" * 200)
    ckpt = json.loads((trained_run / "results.json").read_text())["best_ckpt"]
    bad = run_cli("charlm.evaluate", f"ckpt_path={ckpt}", "data=text", f"data.path={text}", check=False)
    assert bad.returncode == 2 and "'é'" in bad.stderr and "Traceback" not in bad.stderr
    ok = run_main("charlm.evaluate", f"ckpt_path={ckpt}", "data=text", f"data.path={text}", "unknown=skip",
                  "split=all", f"json={tmp_path / 'e.json'}")  # the same command in this process
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["skipped_chars"] == 200 and ev["chars_scored"] == 200 * 8 - 1, ok.stdout
