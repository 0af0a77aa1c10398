"""The cold-start loss (charlm.scoring.cold_start): hand-made models whose cold start is known exactly."""

import math

import pytest
import torch
from torch import nn

from charlm.scoring.cold_start import cold_start_line, cold_start_loss, cold_starts, paired_difference


class WarmsUp(nn.Module):
    """Predicts the next character of ids[t+1] = ids[t] + 1 (mod V): uniformly for the first `cold` characters
    after an empty state, then with logit 2 on the right one. Its state counts the characters read."""

    def __init__(self, vocab_size: int, cold: int):
        super().__init__()
        self.vocab_size, self.cold = vocab_size, cold
        self.embed = nn.Embedding(vocab_size, 1)  # unused: the contract's token embedding

    def forward(self, idx, state=None):
        B, T = idx.shape
        read = (0 if state is None else state) + torch.arange(1, T + 1)          # (T,) characters read so far
        logits = 2.0 * nn.functional.one_hot((idx + 1) % self.vocab_size, self.vocab_size).float()  # (B, T, V)
        logits = logits * (read > self.cold)[None, :, None]
        return logits, int(read[-1])


def test_offsets_are_seeded_distinct_and_leave_room():
    a, b = cold_starts(1000, 64, 32, 0), cold_starts(1000, 64, 32, 0)
    assert torch.equal(a, b) and len(set(a.tolist())) == 64
    assert int(a.max()) + 32 < 1000 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, cold_starts(1000, 64, 32, 1))
    assert len(cold_starts(40, 64, 32, 0)) == 8 and len(cold_starts(32, 64, 32, 0)) == 0


def test_cold_start_loss_of_a_model_that_warms_up_after_8_characters():
    V = 8
    ids = torch.arange(3000) % V
    r = cold_start_loss(WarmsUp(V, cold=8), ids)
    uniform, warm = math.log(8), math.log(1 + 7 * math.exp(-2))  # 2.0794, 0.6664
    assert r["loss"] == pytest.approx((8 * uniform + 24 * warm) / 32, rel=1e-6)
    assert r["se"] == pytest.approx(0.0, abs=1e-9)  # every offset the same
    assert r["protocol"]["positions"] == 64 and r["protocol"]["chars"] == 32 and len(r["losses"]) == 64
    assert cold_start_line(r["loss"], r["protocol"]).startswith("cold start: 1.0197 nats (first 32 chars")


def test_a_window_shorter_than_32_reads_its_window():
    model = WarmsUp(8, cold=0)
    model.context_size = 16
    r = cold_start_loss(model, torch.arange(500) % 8, positions=10)
    assert r["protocol"]["chars"] == 16 and r["protocol"]["positions"] == 10


def test_paired_difference():
    mean, se = paired_difference([1.0, 2.0, 3.0], [0.5, 1.0, 2.0])  # differences 0.5, 1, 1
    assert mean == pytest.approx(2.5 / 3) and se == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))
    with pytest.raises(ValueError, match="same offsets"):
        paired_difference([1.0, 2.0], [1.0])


def test_too_short_a_split_has_no_figure():
    r = cold_start_loss(WarmsUp(8, cold=0), torch.arange(20) % 8)
    assert r["loss"] is None and cold_start_line(r["loss"], r["protocol"]) is None
