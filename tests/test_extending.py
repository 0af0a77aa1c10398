"""The worked examples of docs/architecture.md's "Adding a data source" and "Adding a study" run: both live
outside the package, in tests/external/, as a user's would."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ROOT
from torch import nn

from charlm.cli import compose
from charlm.data.vocab import CharVocab
from charlm.errors import ConfigError, CorpusError
from charlm.train import check_config
from charlm.training.build import build_data

EXT = ROOT / "tests" / "external"
SEARCH = f"hydra.searchpath=[file://{EXT / 'conf'}]"


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """tests/external importable (as PYTHONPATH would make it) and a fresh corpus cache."""
    monkeypatch.syspath_prepend(str(EXT))
    monkeypatch.setenv("CHARLM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def csv_config(csv_path, column: str):
    return compose("train", [SEARCH, "data=csv_column", f"data.path={csv_path}", f"data.column={column}",
                             "data.block_size=8", "data.batch_size=4", "data.val_fraction=0.5", "model=lstm"])


def test_a_csv_column_is_a_corpus(outside):
    """The column's rows, joined by newlines, are the corpus: its vocabulary holds exactly their characters
    (none of the other column's), every character is in a split, and a training batch comes out."""
    csv_path = outside / "lines.csv"
    rows = ["abcabcabcabcabcabcab", "cbacbacbacbacbacbacb"] * 2
    csv_path.write_text("id,line\n" + "".join(f"{9 - i},{r}\n" for i, r in enumerate(rows)))
    cfg = csv_config(csv_path, "line")
    check_config(cfg)                                  # data.column is typed from CSVColumn's signature
    dm = build_data(cfg)
    assert dm.vocab.chars == ["\n", "a", "b", "c"]
    assert sum(len(dm.splits[s]) for s in ("train", "val", "test")) == 4 * 20 + 3
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])            # y is x one character on


def test_a_missing_csv_column_is_one_line(outside):
    csv_path = outside / "lines.csv"
    csv_path.write_text("id,line\n1,abc\n")
    with pytest.raises(CorpusError, match=r"no column 'text' \(data.column\)"):
        build_data(csv_config(csv_path, "text"))
    with pytest.raises(ConfigError, match="data.column"):
        check_config(compose("train", [SEARCH, "data=csv_column", f"data.path={csv_path}", "data.column=[1,2]"]))


class Uniform(nn.Module):
    """A model that knows nothing: equal logits for every symbol, so every character costs log2(V) bits."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, 1)  # unused: every model has a token embedding (models/contract.py)

    def forward(self, idx, state=None):
        return torch.zeros(*idx.shape, self.vocab_size), state          # (B, T, V)


class Copycat(nn.Module):
    """Certain that the next character repeats the current one."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, 1)  # unused: every model has a token embedding (models/contract.py)

    def forward(self, idx, state=None):
        return 50.0 * nn.functional.one_hot(idx, self.vocab_size).float(), state   # (B, T, V)


def test_a_study_from_outside(outside):
    from class_surprisal import class_surprisal

    text = "aa 11 bb, 22"
    vocab = CharVocab.from_text(text)                                   # 6 symbols: " ", ",", "1", "2", "a", "b"
    r = class_surprisal(Uniform(len(vocab)), vocab, text)
    assert {k: v["chars"] for k, v in r.items()} == {"letter": 3, "digit": 4, "space": 3, "other": 1}
    for v in r.values():
        assert v["bpc"] == pytest.approx(math.log2(6))
    r = class_surprisal(Copycat(len(vocab)), vocab, "aaab")
    assert r["letter"]["chars"] == 3
    assert r["letter"]["bpc"] == pytest.approx(50 / 3 / math.log(2), rel=1e-3)  # two repeats free, "b" costs 50 nats
