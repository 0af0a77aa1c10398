"""`charlm.export`: a folder of safetensors + JSON that charlm's commands read as they read the checkpoint (same
results), that loads without them (docs/export.md's snippet), and whose config is checked like a checkpoint's."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import ROOT, run_main
from safetensors import safe_open

from charlm.checkpoint import load_model, save_model
from charlm.data.vocab import CharVocab
from charlm.export import export
from charlm.models.contract import build_model

FILES = {"model.safetensors", "config.json", "vocab.json", "README.md"}
TIED = {"_target_": "charlm.models.rnn.RNNLM", "cell": "gru", "embed_dim": 12, "hidden_dim": 12, "num_layers": 1,
        "dropout": 0.0, "forget_bias": 1.0, "tie_weights": True}


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """(the tiny run's best checkpoint, its exported folder), exported through the CLI."""
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    out = tmp_path_factory.mktemp("export") / "lstm"
    ran = run_main("charlm.export", f"ckpt_path={ckpt}", f"out={out}")
    assert ran.stdout.startswith(f"wrote {out}")
    return ckpt, out


def test_the_folder_holds_no_pickle(exported):
    ckpt, out = exported
    assert {p.name for p in out.iterdir()} == FILES
    for p in out.iterdir():
        assert p.read_bytes()[:2] not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05")  # zip (torch.save), pickle
    config, vocab = json.loads((out / "config.json").read_text()), json.loads((out / "vocab.json").read_text())
    assert config["model_name"] == "lstm" and config["class"] == "charlm.models.rnn.RNNLM"
    assert config["args"]["hidden_dim"] == 32 and "_target_" not in config["args"]  # conftest's TINY
    assert vocab["unit"] == "char" and len(vocab["chars"]) == config["vocab_size"] == 65  # tiny shakespeare
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert names == {k[len("model."):] for k in weights if k.startswith("model.")}
        for name in names:
            assert torch.equal(f.get_tensor(name), weights[f"model.{name}"])


def test_the_model_card(exported, trained_run):
    _, out = exported
    card = (out / "README.md").read_text()
    results = json.loads((trained_run / "results.json").read_text())
    params = json.loads((out / "config.json").read_text())["params"]
    assert f"| parameters | {params:,} |" in card and params == results["params"]
    assert f"{results['best_val_loss']:.4f} nats" in card and results["protocol"]["text"] in card
    assert "| corpus | tinyshakespeare |" in card
    assert "python -m charlm.export ckpt_path=" in card and "python -m charlm.train trainer=cpu" in card


def test_sample_gives_the_same_text(exported):
    ckpt, out = exported
    texts = [run_main("charlm.sample", f"ckpt_path={p}", "n_chars=120", "seed=7", "prompt=ROMEO:").stdout
             for p in (ckpt, out)]
    assert texts[0] == texts[1] and len(texts[0]) > 120


def test_evaluate_and_explain_give_the_same_figures(exported, tmp_path):
    ckpt, out = exported
    scores = []
    for i, p in enumerate((ckpt, out)):
        run_main("charlm.evaluate", f"ckpt_path={p}", "eval.max_chars=3000", f"json={tmp_path / f'{i}.json'}")
        scores.append({k: v for k, v in json.loads((tmp_path / f"{i}.json").read_text()).items()
                       if k != "checkpoint"})
    assert scores[0] == scores[1] and scores[0]["chars_scored"] == 2999
    lines = [run_main("charlm.explain", f"ckpt_path={p}", "text=To be, or not to be", f"out={tmp_path / str(i)}").stdout
             for i, p in enumerate((ckpt, out))]
    bits = [re.search(r": ([0-9.]+) bits/char", line)[1] for line in lines]
    assert bits[0] == bits[1]


@pytest.mark.parametrize("tamper, message", [
    (lambda c: c.update({"class": "builtins.open"}), "model._target_=builtins.open: not a model charlm registers"),
    (lambda c: c["args"].update({"_target_": "os.getcwd"}), "config.args._target_: a nested _target_"),
    (lambda c: c["args"].update({"forget_bias": {"_target_": "os.getcwd"}}), "config.args.forget_bias._target_"),
    (lambda c: c["args"].update({"hidden_dim": "big"}), "model.hidden_dim=big: expected an integer"),
])
def test_a_tampered_config_is_refused(exported, tmp_path, tamper, message):
    _, out = exported
    folder = tmp_path / "tampered"
    shutil.copytree(out, folder)
    config = json.loads((folder / "config.json").read_text())
    tamper(config)
    (folder / "config.json").write_text(json.dumps(config))
    ran = run_main("charlm.sample", f"ckpt_path={folder}", "n_chars=5", check=False)
    assert ran.returncode == 2
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder / 'config.json'}: {message}"), ran.stderr


def test_tied_weights_round_trip(tmp_path):
    vocab = CharVocab.from_text("abcdefgh \n")
    torch.manual_seed(0)
    model = build_model(TIED, len(vocab)).eval()
    export(save_model(tmp_path / "tied.ckpt", model, TIED, vocab, "gru"), tmp_path / "out")
    again, vocab_again, hp = load_model(tmp_path / "out")
    idx = torch.randint(0, len(vocab), (2, 9))
    assert vocab_again == vocab and hp["model_name"] == "gru"
    assert torch.equal(again(idx)[0], model(idx)[0])


def test_refusals_write_nothing(tmp_path):
    vocab = CharVocab.from_text("abc")
    ckpt = save_model(tmp_path / "m.ckpt", build_model(TIED, len(vocab)), TIED, vocab, "gru")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    ran = run_main("charlm.export", f"ckpt_path={ckpt}", f"out={tmp_path / 'full'}", check=False)
    assert ran.returncode == 2 and "exists and is not an empty folder" in ran.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    crafted = torch.load(ckpt, weights_only=True)
    crafted["hyper_parameters"]["model"]["hidden_dim"] = {"_target_": "os.getcwd"}
    torch.save(crafted, tmp_path / "crafted.ckpt")
    ran = run_main("charlm.export", f"ckpt_path={tmp_path / 'crafted.ckpt'}", f"out={tmp_path / 'new'}", check=False)
    assert ran.returncode == 2 and "model.hidden_dim._target_: a nested _target_" in ran.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.ckpt", "full", "m.ckpt"]


def test_the_documented_snippet_loads_the_folder(exported, capsys):
    """docs/export.md's code, run as written (the folder's path filled in): the same logits as charlm's loader."""
    _, out = exported
    doc = (ROOT / "docs" / "export.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S)[1]
    assert len([line for line in code.splitlines() if line.strip()]) < 20  # blank lines apart
    assert code.count('"exported/lstm"') == 1
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code.replace('"exported/lstm"', repr(str(out))), "export.md", "exec"), namespace)  # noqa: S102
    text = capsys.readouterr().out.rstrip("\n")
    charlm_model, vocab, _ = load_model(out)
    assert len(text) == 200 and set(text) <= set(vocab.chars)
    idx = torch.tensor([vocab.encode("ROMEO: what light")])
    with torch.no_grad():
        assert torch.equal(namespace["model"](idx)[0], charlm_model(idx)[0])
