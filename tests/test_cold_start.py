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


# ---- state_reset: training that also starts streams cold -----------------------------------------

TINY_LSTM = {"_target_": "charlm.models.rnn.RNNLM", "cell": "lstm", "embed_dim": 8, "hidden_dim": 16}


class StatesSeen(nn.Module):
    """Wraps a model and records, per forward call in training mode, whether it got a carried state."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.warm = inner, []

    def forward(self, idx, state=None):
        if self.training:
            self.warm.append(state is not None)
        return self.inner(idx, state)


def fit_streams(tmp_path, state_reset: float, steps: int, seed: int = 5):
    import lightning as L

    from charlm.data.datamodule import CharDataModule
    from charlm.training.module import CharLM

    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    dm = CharDataModule(path=str(tmp_path / "c.txt"), block_size=8, batch_size=4, sampling="stream")
    dm.setup()
    L.seed_everything(seed, verbose=False)
    module = CharLM(model=TINY_LSTM, vocab=dm.vocab.to_dict(), sample={"n_chars": 0}, carry_state=True,
                    state_reset=state_reset)
    module.model = StatesSeen(module.model)
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=dm)
    return module


def test_state_reset_starts_streams_cold_at_the_drawn_steps(tmp_path):
    never = fit_streams(tmp_path, 0.0, 40).model.warm
    assert never == [False] + [True] * 39  # cold only at the first chunk (the streams' start)
    always = fit_streams(tmp_path, 1.0, 10).model.warm
    assert always == [False] * 10
    some = fit_streams(tmp_path, 0.25, 200).model.warm
    assert some == fit_streams(tmp_path, 0.25, 200).model.warm  # drawn from (seed, step): the same again
    assert some != fit_streams(tmp_path, 0.25, 200, seed=6).model.warm
    cold = some[1:].count(False)
    assert 25 <= cold <= 75  # 199 draws at p = 0.25: mean 50, sd 6.1


def test_state_reset_draws_are_the_same_after_a_resume_boundary():
    """The draws are a function of (seed, step): asking from any step on gives the same answers."""
    from charlm.rng import StepDraws

    uninterrupted, resumed = StepDraws(0.3, seed=42, block=64), StepDraws(0.3, seed=42, block=64)
    whole = [uninterrupted(s) for s in range(256)]
    assert [resumed(s) for s in range(100, 140)] == whole[100:140]  # across a block's end
    assert 0.2 < sum(whole) / len(whole) < 0.4  # 256 draws at p = 0.3: sd 0.03
    assert whole != [StepDraws(0.3, seed=43, block=64)(s) for s in range(256)]
    assert not any(StepDraws(0.0, seed=42)(s) for s in range(100))


def test_state_reset_outside_0_1_is_one_line(tmp_path):
    from conftest import run_main

    r = run_main("charlm.train", "state_reset=1.5", "logger=none", f"hydra.run.dir={tmp_path}/run", check=False)
    assert r.returncode == 2
    assert "state_reset=1.5: must be a probability in [0, 1]" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_writes_and_prints_its_cold_start_loss(tmp_path):
    import json

    from conftest import TINY, run_main

    r = run_main("charlm.train", *TINY, "state_reset=0.2", f"hydra.run.dir={tmp_path}")
    res = json.loads((tmp_path / "results.json").read_text())
    assert 0 < res["cold_start_loss"] < 10 and res["cold_start_se"] > 0
    assert res["cold_start_protocol"] == {"positions": 64, "chars": 32, "seed": 0, "text": (
        "first 32 chars from an empty state at 64 seeded offsets, seed 0")}
    assert f"cold start: {res['cold_start_loss']:.4f} nats (first 32 chars" in r.stdout
