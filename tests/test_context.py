"""The context a model uses (charlm.studies.context): hand-made models whose context is known exactly."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from charlm.scoring.context_verdicts import context_cell, effective_context, effective_text, plateau_context
from charlm.studies.context import GRID, claim_line, context_use, markdown, sample_positions, summary

GRID_SMALL = [1, 2, 3, 4, 6, 8, 11, 16, 23, 32]


class CurrentCharOnly(nn.Module):
    """Reads the current character alone: an embedding straight to the head (no state)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, vocab_size)

    def forward(self, idx, state=None):
        return self.head(self.embed(idx)), None  # (B, T, V)


class TenBack(nn.Module):
    """Predicts ids[t+1] = ids[t-9] with near certainty; its state is the last 10 ids (-1: not read yet).
    With fewer than 10 characters read it has nothing to copy and predicts uniformly."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, 1)  # unused: the contract's token embedding

    def forward(self, idx, state=None):
        B, T = idx.shape
        past = torch.full((B, 10), -1, dtype=torch.long) if state is None else state
        seq = torch.cat([past, idx], 1)                       # (B, 10 + T)
        back = seq[:, 1 : T + 1]                              # (B, T): ids[t-9], -1 if not read
        logits = 50.0 * F.one_hot(back.clamp(min=0), self.vocab_size).float()  # (B, T, V)
        logits = logits * (back >= 0)[..., None]
        return logits, seq[:, -10:]


class Recorder(nn.Module):
    """Wraps a model and records every forward call's input."""

    def __init__(self, inner: nn.Module, context_size=None):
        super().__init__()
        self.inner = inner
        self.calls: list[torch.Tensor] = []
        if context_size is not None:
            self.context_size = context_size

    def forward(self, idx, state=None):
        self.calls.append(idx.clone())
        return self.inner(idx, state)


def periodic(n: int, period: int = 10, vocab: int = 7, seed: int = 0) -> torch.Tensor:
    pattern = torch.randint(0, vocab, (period,), generator=torch.Generator().manual_seed(seed))
    return pattern.repeat(n // period + 1)[:n]


def test_current_char_only_is_flat_with_effective_context_1():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (900,), generator=torch.Generator().manual_seed(1))
    r = context_use(CurrentCharOnly(11), ids, n_positions=200, grid=GRID_SMALL, min_offset=40)
    losses = list(r["context_use"].values())
    assert len(losses) == len(GRID_SMALL)
    for v in losses:
        assert v == pytest.approx(losses[0], rel=1e-6)
    assert r["full_context_loss"] == pytest.approx(losses[0], rel=1e-6)
    assert r["effective_context"] == 1 and r["reached"]


def test_ten_back_model_needs_11_on_the_grid():
    V = 7
    ids = periodic(1200, 10, V)
    r = context_use(TenBack(V), ids, n_positions=300, grid=GRID_SMALL, min_offset=40)
    curve = r["context_use"]
    for k in (1, 2, 3, 4, 6, 8):  # ids[p-9] not read: uniform over V
        assert curve[k] == pytest.approx(math.log(V), rel=1e-5)
    for k in (11, 16, 23, 32):  # read: near-certain
        assert curve[k] < 1e-6
    assert r["full_context_loss"] < 1e-6
    assert r["effective_context"] == 11
    exact = context_use(TenBack(V), ids, n_positions=300, grid=[9, 10], min_offset=40)["context_use"]
    assert exact[9] == pytest.approx(math.log(V), rel=1e-5) and exact[10] < 1e-6  # k counts the characters read


def test_not_reached_when_no_grid_point_gets_there():
    ids = periodic(1200, 10, 7)
    r = context_use(TenBack(7), ids, n_positions=100, grid=[1, 2, 4, 8], min_offset=40)
    assert r["effective_context"] is None and not r["reached"]
    assert r["plateau_context"] == 1  # uniform at every k: flat from the start
    assert r["cold_start_gap"] == pytest.approx(math.log(7), rel=1e-5) and r["cold_start_gap_pct"] is None  # full: 0
    assert effective_text(r) == "> 8"


def test_full_context_equals_a_plain_one_stream_loop():
    """The reference is the yardstick's one-stream pass; recomputed here one character at a time."""
    torch.manual_seed(0)
    from charlm.models.rnn import RNNLM

    model = RNNLM(vocab_size=9, cell="lstm", embed_dim=6, hidden_dim=12, num_layers=1, dropout=0.0,
                  forget_bias=1.0, tie_weights=False).eval()
    ids = torch.randint(0, 9, (200,), generator=torch.Generator().manual_seed(2))
    r = context_use(model, ids, n_positions=80, seed=3, grid=[1, 4, 16], min_offset=20)
    losses, state = [], None
    with torch.no_grad():
        for t in range(len(ids) - 1):
            logits, state = model(ids[t : t + 1][None], state)  # (1, 1, V), state carried from ids[0]
            losses.append(float(F.cross_entropy(logits[0], ids[t + 1 : t + 2])))
    positions = sample_positions(len(ids), 80, 3, 20)
    expected = sum(losses[p] for p in positions.tolist()) / len(positions)
    assert r["full_context_loss"] == pytest.approx(expected, rel=1e-5)


def test_same_positions_at_every_k_and_batched():
    """ids[i] = i, so each window names its own position: every k scores the same sampled positions,
    reading exactly ids[p-k+1 .. p], in a few forward calls."""
    n, P, bs, grid = 1500, 300, 128, [1, 3, 8, 23]
    ids = torch.arange(n)
    model = Recorder(CurrentCharOnly(n))
    r = context_use(model, ids, n_positions=P, grid=grid, min_offset=100, batch_size=bs)
    assert r["positions"] == P
    windows = [c for c in model.calls if c.shape[0] > 1]  # the full-context pass is one stream (one row)
    assert len(windows) == len(grid) * math.ceil(P / bs)  # 3 calls per k
    expected = sample_positions(n, P, 0, 100)
    for k in grid:
        rows = torch.cat([c for c in windows if c.shape[1] == k])
        assert len(rows) == P
        assert torch.equal(rows[:, -1], expected)                              # the same positions
        assert torch.equal(rows, expected[:, None] + torch.arange(-k + 1, 1))  # exactly the last k characters
    assert len(set(expected.tolist())) == P and int(expected.min()) >= 100


def test_a_recurrent_model_reads_long_windows_in_chunks_with_the_same_losses():
    """TenBack carries its last 10 ids as state: read in chunks of 4 it scores every position as read whole,
    and each window is fed as consecutive pieces that together are exactly its last k characters."""
    n, P, bs, grid = 400, 40, 16, [3, 11, 23]
    ids = torch.arange(n) % 10  # period 10: the character 10 back is the next one
    whole = context_use(TenBack(10), ids, n_positions=P, grid=grid, min_offset=30, batch_size=bs, chunk=None)
    model = Recorder(TenBack(10))
    pieces = context_use(model, ids, n_positions=P, grid=grid, min_offset=30, batch_size=bs, chunk=4)
    assert pieces["context_use"] == pytest.approx(whole["context_use"], abs=1e-9)
    assert pieces["context_use"][11] < 0.01 < pieces["context_use"][3]  # it copies once 10 characters are read
    windows = [c for c in model.calls if c.shape[0] > 1]
    assert len(windows) == sum(math.ceil(k / 4) for k in grid) * math.ceil(P / bs)
    assert {c.shape[1] for c in windows} == {3, 4}  # 3 = 3, 11 = 4+4+3, 23 = 4*5+3


def test_windowed_model_reads_at_most_its_window():
    n, grid = 600, [1, 4, 16, 32]
    model = Recorder(CurrentCharOnly(n), context_size=8)
    r = context_use(model, torch.arange(n), n_positions=50, grid=grid, min_offset=40)
    lengths = {c.shape[1] for c in model.calls if c.shape[0] == 50}
    assert lengths == {1, 4, 8}  # k=16 and k=32 read the same 8 characters, measured once
    assert r["context_use"][16] == r["context_use"][32]


def test_default_grid_and_short_split():
    assert GRID[0] == 1 and GRID[-1] == 1024 and len(GRID) == 20
    assert all(1.3 < b / a < 1.6 for a, b in zip(GRID[4:], GRID[5:]))  # about sqrt(2) apart
    from charlm.errors import CorpusError

    with pytest.raises(CorpusError, match="needs at least 3,025"):
        context_use(CurrentCharOnly(5), torch.zeros(3000, dtype=torch.long))


class ColdCostly(nn.Module):
    """Predicts ids[t+1] = 1 + ids[t] % 7 with logit 2 on it once it has read the marker 0 (only ids[0] is one),
    with logit 1 before: a cold start (any window that misses the split's start) costs the same extra loss at
    every k. Its state: whether the marker was read, (B,) bool."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 1)  # unused: the contract's token embedding

    def forward(self, idx, state=None):
        seen = torch.zeros(idx.shape[0], dtype=torch.bool) if state is None else state
        seen = seen[:, None] | ((idx == 0).long().cummax(1).values > 0)            # (B, T)
        nxt = F.one_hot(1 + idx % 7, 8).float()                                    # (B, T, V)
        return nxt * torch.where(seen, 2.0, 1.0)[..., None], seen[:, -1]


def cold_costly_ids(n: int = 1500) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.arange(n - 1) % 7])  # marker, then 1..7 cycling


WARM, COLD = math.log(1 + 7 * math.exp(-2)), math.log(1 + 7 * math.exp(-1))  # 0.6664, 1.2740 nats


def test_a_cold_start_that_costs_a_fixed_loss_at_every_k_is_not_reached_with_that_gap():
    r = context_use(ColdCostly(), cold_costly_ids(), n_positions=200, grid=GRID_SMALL, min_offset=40)
    assert r["full_context_loss"] == pytest.approx(WARM, rel=1e-6)
    for k in GRID_SMALL:
        assert r["context_use"][k] == pytest.approx(COLD, rel=1e-6)
    assert r["effective_context"] is None and not r["reached"] and r["plateau_context"] == 1
    assert r["cold_start_gap"] == pytest.approx(0.607541, abs=1e-5)          # COLD - WARM
    assert r["cold_start_gap_pct"] == pytest.approx(91.1583, abs=1e-3)       # 100 (COLD / WARM - 1)
    lines = "\n".join(summary(r))
    assert "effective context: not reached (> 32 chars): no k is at most 1% and 2 paired SE above" in lines
    assert "plateau: 1 chars" in lines
    assert "cold-start gap (the loss at k=32 against full context): +91.2% (+0.6075 nats); the curve is flat from " \
           "k=1 on yet stays above full context: the gap is what reading from an empty state costs" in lines
    line = claim_line("CS224N: \"an LSTM keeps about 100 steps\"", r, 100, "steps", 5.0)
    assert ": not determined: the effective context was not reached (> 32 chars;" in line and "plateau at 1" in line
    md = "\n".join(markdown({"lstm": r}, 5.0))
    assert "- lstm: full context 0.6665 nats, k=1 1.2740, effective context not reached (> 32 chars; plateau 1 " \
           "chars, cold-start gap +91.2% (+0.6075 nats)) (200 positions)." in md
    assert md.count("not determined") == 2  # both LSTM claims; the RNN's has no checkpoint


def test_effective_context_needs_the_band_and_two_paired_se():
    curve, full = {1: 2.0, 4: 1.005, 8: 1.004, 16: 1.0}, 1.0
    assert effective_context(curve, full) == 4                                   # 1% band alone (older records)
    se = {1: 0.1, 4: 0.001, 8: 0.003, 16: 0.001}
    assert effective_context(curve, full, se) == 8      # k=4: +0.005 > 2 x 0.001; k=8: +0.004 <= 2 x 0.003
    assert effective_context({1: 2.0, 4: 1.03}, full, {1: 0.5, 4: 0.5}) is None  # within 2 SE, not within 1%
    assert effective_context({1: 0.9}, full, {1: 0.0}) == 1                        # below full context: reached


def test_plateau_of_the_wandering_curve():
    """An undertrained LSTM's curve (300 steps): flat by k=16 within 1% of the loss at k=1024, never within 1% of
    the full-context loss 1.962."""
    curve = {1: 2.894, 4: 2.167, 16: 2.096, 32: 2.037, 45: 2.169, 128: 2.175, 181: 2.029, 512: 2.111, 1024: 2.109}
    assert plateau_context(curve) == 16                 # 2.096 <= 2.109 x 1.01 = 2.130; 2.167 is not
    assert effective_context(curve, 1.962) is None      # 2.029 > 1.962 x 1.01 = 1.982


def context_json(folder, curve, full, se=None):
    folder.mkdir(parents=True)
    (folder / "context.json").write_text(json.dumps(
        {"context_use": {str(k): v for k, v in curve.items()}, "full_context_loss": full, "positions": 100,
         "chars_per_word": 5.0, **({"paired_se": {str(k): v for k, v in se.items()}} if se else {})}))


def test_compare_column_and_context_md_render_the_not_reached_case(tmp_path):
    from charlm.studies.compare_context import context_report

    out = tmp_path / "cmp"
    flat = {1: 3.0, 16: 2.17, 32: 2.16, 1024: 2.15}    # plateau 16 (2.17 <= 2.15 x 1.01), gap 2.15 / 2.0 = +7.5%
    context_json(out / "lstm-1", flat, 2.0, {1: 0.01, 16: 0.01, 32: 0.01, 1024: 0.01})
    context_json(out / "lstm-2", {1: 3.0, 16: 2.1, 32: 2.12, 1024: 2.15}, 2.0)   # plateau 16, gap +7.5%
    context_json(out / "rnn-1", {1: 3.0, 8: 2.01, 16: 2.0, 1024: 2.0}, 2.0)      # reached at 8
    context_json(out / "rnn-2", {1: 3.0, 8: 2.1, 16: 2.0, 1024: 2.0}, 2.0)       # reached at 16
    read = [json.loads((out / f / "context.json").read_text()) for f in ("lstm-1", "lstm-2", "rnn-1", "rnn-2")]
    assert context_cell(read[:2]) == "> 1,024 (plateau 16, gap +7.5%)"
    assert context_cell(read[2:]) == "12"
    assert context_cell([read[0], read[2]]) == "8 (1 of 2 seeds not reached)"
    assert context_cell([{}]) == ""
    assert context_report(out, ["rnn", "lstm"], [1, 2])
    md = (out / "context.md").read_text()
    assert "- lstm: full context 2.0000 nats, k=1 3.0000, effective context not reached (> 1024 chars; plateau 16 " \
           "chars, cold-start gap +7.5% (+0.1500 nats)) (100 positions)." in md
    assert "- rnn: full context 2.0000 nats, k=1 3.0000, effective context 8 chars (100 positions)." in md
    assert "an LSTM keeps about 100 steps\": not determined" in md
    assert "a vanilla RNN about 7\": measured 8 chars within 1% of full context: agrees" in md


def test_the_leaderboard_shows_the_compare_column(tmp_path):
    from charlm.scoring.leaderboard import run_row

    out = tmp_path / "cmp"
    context_json(out / "lstm-1", {1: 3.0, 16: 2.17, 1024: 2.15}, 2.0)
    (out / "lstm-1" / "results.json").write_text(json.dumps({"best_val_bpc": 2.9, "best_val_loss": 2.0}))
    assert run_row(out, "lstm", [1])["context_cell"] == "> 1,024 (plateau 16, gap +7.5%)"
