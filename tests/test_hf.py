"""Hugging Face datasets as corpora (charlm.data.hf), on local datasets built here (the hub is out of reach):
a save_to_disk folder and parquet files train and give the ids of the same text read as a plain file,
data.hf_splits maps three splits exactly, data.max_chars keeps exactly the first N characters, evaluate
reads the dataset's own test split, and bad input is one line with exit status 2."""

from __future__ import annotations

import datasets
import pytest
from conftest import TINY, run_cli

from charlm import cli
from charlm.data.corpus import embedded_corpus
from charlm.data.datamodule import CharDataModule
from charlm.data.hf import HFDataModule, hf_text, joined
from charlm.errors import CorpusError

QUICK = [*TINY, "trainer.max_steps=3", "trainer.val_check_interval=3", "sample.n_chars=0",
         "eval.window_batches=0", "eval.max_chars=500", "model.hidden_dim=16", "model.embed_dim=8"]


def shakespeare_rows(start: int, n_chars: int) -> list[str]:
    """Lines of the embedded corpus (one row each), about n_chars characters from `start`."""
    text = open(embedded_corpus(), encoding="utf-8").read()[start : start + n_chars]
    return text.split("\n")


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Corpus and datasets caches of this test's own."""
    monkeypatch.setenv("CHARLM_CACHE", str(tmp_path / "charlm-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def rows():
    return shakespeare_rows(0, 6000)


def saved_dataset(tmp_path, rows) -> str:
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))}).save_to_disk(str(folder))
    return str(folder)


def parquet_files(tmp_path, rows) -> str:
    """Two parquet files (rows split between them), named so that sorting keeps their order."""
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        datasets.Dataset.from_dict({"text": part}).to_parquet(str(tmp_path / f"part-{i}.parquet"))
    return str(tmp_path / "part-*.parquet")


def plain_file(tmp_path, text: str) -> str:
    path = tmp_path / "plain.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_joined_reads_line_ends_as_a_text_file_does(tmp_path):
    rows = ["a\r\nb", "c\r", "d", "", "e\rf"]
    path = tmp_path / "crlf.txt"
    path.write_bytes("\n".join(rows).encode())
    with open(path, encoding="utf-8", newline=None) as f:  # universal newlines, as charlm reads text files
        expected = f.read()
    assert expected == "a\nb\nc\nd\n\ne\nf"  # "c\r" + "\n" between rows is one line end
    assert "".join(joined(iter(rows))) == expected
    assert "".join(joined(iter(rows), max_chars=5)) == expected[:5]


@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_trains_and_matches_the_plain_file(tmp_path, rows, kind):
    source = saved_dataset(tmp_path, rows) if kind == "saved" else parquet_files(tmp_path, rows)
    from charlm.train import run

    results = run(cli.compose("train", [*QUICK, "data=hf", f"data.path={source}"]), tmp_path / "run", "lstm")
    assert results["steps"] == 3
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()

    hf = HFDataModule(path=source)
    hf.prepare()
    plain = CharDataModule(path=plain_file(tmp_path, "\n".join(rows)))
    plain.prepare()
    assert hf.vocab == plain.vocab
    for split in ("train", "val", "test"):
        assert hf.splits[split].tolist() == plain.splits[split].tolist(), split
    assert len(hf.splits["train"]) + len(hf.splits["val"]) == len("\n".join(rows))


def test_hf_splits_maps_three_splits_exactly_and_evaluate_reads_them(tmp_path):
    parts = {"train": shakespeare_rows(0, 5000), "validation": shakespeare_rows(5000, 1500),
             "test": shakespeare_rows(6500, 1200)}
    folder = tmp_path / "dict"
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()}).save_to_disk(
        str(folder))
    mapping = "data.hf_splits={train: train, val: validation, test: test}"
    cfg = cli.compose("train", [*QUICK, "data=hf", f"data.path={folder}", mapping])
    from charlm.train import run

    run(cfg, tmp_path / "run", "lstm")

    dm = HFDataModule(path=str(folder), hf_splits={"train": "train", "val": "validation", "test": "test"})
    dm.prepare()
    for ours, theirs in (("train", "train"), ("val", "validation"), ("test", "test")):
        assert dm.vocab.decode(dm.splits[ours].tolist()) == "\n".join(parts[theirs]), ours

    from charlm.evaluate import evaluate

    ecfg = cli.compose("evaluate", [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}", "data=hf",
                                    f"data.path={folder}", mapping, "split=test", "eval.window_batches=0",
                                    "device=cpu"])
    out = evaluate(ecfg)
    assert out["chars_scored"] == len("\n".join(parts["test"])) - 1  # every next character once


def test_max_chars_keeps_exactly_the_first_n(tmp_path, rows):
    source = parquet_files(tmp_path, rows)
    n = 3001
    dm = HFDataModule(path=source, max_chars=n)
    dm.prepare()
    text = dm.vocab.decode(dm.splits["train"].tolist()) + dm.vocab.decode(dm.splits["val"].tolist())
    assert text == "\n".join(rows)[:n]
    assert len(dm.splits["train"]) == int(n * 0.9)  # charlm's cut of the first n characters


def test_wrong_and_non_text_columns_unknown_split_and_empty_are_refused(tmp_path, rows):
    folder = saved_dataset(tmp_path, rows)
    with pytest.raises(CorpusError, match=r"column 'n' holds int64, not text \(text columns: text\)"):
        hf_text(path=folder, column="n", verbose=False)
    with pytest.raises(CorpusError, match=r"no split 'validation' \(splits: train\)"):
        hf_text(path=folder, hf_splits={"train": "train", "val": "validation"}, verbose=False)
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})
                               ).save_to_disk(str(empty))
    with pytest.raises(CorpusError, match="empty"):
        hf_text(path=str(empty), verbose=False)
    assert not [p for p in (tmp_path / "charlm-cache" / "hf").iterdir() if p.name.startswith(".")]  # no leftovers


def one_line_refusal(proc, *fragments: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_offline_dataset_and_wrong_column_are_one_line(tmp_path, rows):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CHARLM_CACHE": str(tmp_path / "charlm-cache"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    proc = run_cli("charlm.train", *QUICK, "data=hf", "data.dataset=charlm-tests/no-such-dataset",
                   f"hydra.run.dir={tmp_path / 'a'}", check=False, env=env)
    one_line_refusal(proc, "data.dataset=charlm-tests/no-such-dataset", "not in the local datasets cache",
                     "HF_HUB_OFFLINE")
    proc = run_cli("charlm.train", *QUICK, "data=hf", f"data.path={saved_dataset(tmp_path, rows)}",
                   "data.column=txt", f"hydra.run.dir={tmp_path / 'b'}", check=False, env=env)
    one_line_refusal(proc, "no column 'txt' (columns: text, n)")


def test_config_keys_are_typed_and_checked():
    from charlm.errors import ConfigError
    from charlm.train import check_config

    cfg = cli.compose("train", [*QUICK, "data=hf", "data.dataset=some/name"])
    assert cfg.data.dataset == "some/name" and cfg.data.column == "text" and cfg.data.hf_splits is None
    assert HFDataModule(dataset="some/name").name == "some/name"  # messages name the hub id
    check_config(cfg)  # a well-formed hf config passes
    for override, message in (("data.max_chars=0", "data.max_chars=0: must be a positive number"),
                              ("data.max_chars=many", "data.max_chars=many: expected an integer or null"),
                              ("data.block_size=x", "data.block_size=x: expected an integer")):
        with pytest.raises(ConfigError, match=message):
            check_config(cli.compose("train", [*QUICK, "data=hf", "data.dataset=some/name", override]))
    with pytest.raises(ConfigError, match="one of them"):
        HFDataModule(dataset="some/name", path="/x")
    with pytest.raises(ConfigError, match="keys must be train and val"):
        HFDataModule(dataset="some/name", hf_splits={"train": "train", "dev": "validation"})
