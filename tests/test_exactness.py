"""Details a careful user checks: a stream that latched from its cold start is named, parameters a model
declares no-decay never decay, and a run's log carries no dependency noise."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, TINY, run_cli, tiny_model_overrides
from torch import nn

from charlm import cli
from charlm.data.vocab import CharVocab
from charlm.training.build import build_module
from charlm.yardstick import EvalStreams, far_streams, latch_warning, score_rows, stream_means

MODEL_NAMES = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))


class Latching(nn.Module):
    """Predicts a fixed unigram; but a stream that starts cold on id 0 latches: from then on it puts almost
    all its mass on id 0, which never comes again."""

    def __init__(self, vocab_size: int = 5, latch: bool = True):
        super().__init__()
        self.vocab_size, self.latch = vocab_size, latch
        self.unigram = torch.log(torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1]))

    def forward(self, idx, state=None):
        if state is None:
            state = (idx[:, 0] == 0) & self.latch                                  # (B,) latched rows
        good = self.unigram.expand(*idx.shape, -1)                                 # (B, T, V)
        bad = torch.full_like(good, -20.0)
        bad[..., 0] = 0.0
        return torch.where(state[:, None, None], bad, good), state


def stretch(n_streams: int = 8, stream_len: int = 400, seed: int = 0) -> torch.Tensor:
    """Ids 1..4 at random, with id 0 only at the start of stream 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 5, (n_streams * stream_len + 1,), generator=g)
    ids[3 * stream_len] = 0
    return ids


def test_a_latched_stream_is_named():
    ids = stretch()
    batches = EvalStreams(ids, block_size=64, streams=8)
    rows, counts = score_rows(Latching(), batches)
    means = stream_means(batches, rows, counts)
    assert len(means) == 8 and int(counts.sum()) == len(ids) - 1
    assert far_streams(means) == [3]
    line = latch_warning(means)
    assert line is not None and "stream 3" in line and "\n" not in line and "README.md#" in line


def test_a_healthy_model_is_quiet():
    ids = stretch()
    batches = EvalStreams(ids, block_size=64, streams=8)
    rows, counts = score_rows(Latching(latch=False), batches)
    means = stream_means(batches, rows, counts)
    assert max(means) - min(means) > 0  # the streams differ a little, as real text does
    assert far_streams(means) == [] and latch_warning(means) is None


def test_the_rule_is_robust_to_the_outlier_itself():
    # one far stream among seven close ones: mean +- sd would hide it (its own deviation inflates the sd)
    means = [1.49, 1.50, 1.48, 1.51, 1.50, 1.49, 1.52, 6.69]
    assert far_streams(means) == [7]
    assert far_streams([1.49, 1.50, 1.48, 1.51, 1.50, 1.49, 1.52, 1.60]) == []  # a harder stretch is not a latch


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_declared_parameters_never_decay(name):
    cfg = cli.compose("train", ["logger=none", f"model={name}", *tiny_model_overrides(name),
                                "optim.weight_decay=0.1"])
    module = build_module(cfg, CharVocab(list("abcde")), "random", name)
    optimizer = module.configure_optimizers()["optimizer"]
    by_id = {id(p): n for n, p in module.model.named_parameters()}
    decaying = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decaying | kept == set(by_id.values()) and not decaying & kept
    for n, p in module.model.named_parameters():
        if n.endswith("A_log"):          # Mamba's state decay rates (the reference marks them no-decay)
            assert n in kept
        elif name in ("slstm", "mlstm", "xlstm") and n == "embed.weight":  # xLSTM's reference: no decay
            assert n in kept
        elif p.dim() >= 2:               # every other matrix decays, as before
            assert n in decaying
        else:                            # biases, norms, 1-D gates never did
            assert n in kept
    if name == "mamba":
        assert any(n.endswith("A_log") for n in kept)
    if name == "xlstm":  # a name of two parts matches only those: the blocks' other weights still decay
        assert "embed.weight" in kept and any(n.endswith(".weight") and n != "embed.weight" for n in decaying)


def test_a_run_log_has_no_dependency_noise(tmp_path):
    run_cli("charlm.train", *TINY, "trainer.max_steps=4", "trainer.val_check_interval=4", "logger=wandb",
            f"hydra.run.dir={tmp_path}", env={"WANDB_MODE": "offline"})
    log = (tmp_path / "train.log").read_text()
    assert "LeafSpec" not in log
    assert "anonymous setting" not in log
    assert "val" in log  # the log itself was written
