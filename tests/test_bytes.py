"""Byte-level corpora (data.unit=byte) and the enwik8/text8 protocol: exact contiguous splits, raw bytes in
(NUL bytes too), a byte vocabulary of at most 256, train/sample/evaluate/resume in byte unit, bits per byte
on a hand-computed case, and one-line refusals. data.unit on every data config; a byte model's prompt and
explain text read as UTF-8 bytes and its samples shown as text; a non-ASCII value on the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cli, run_main
from hydra.utils import get_class
from omegaconf import OmegaConf

from charlm.checkpoint import load_model, save_model
from charlm.cli import compose
from charlm.data.corpus import encode_corpus
from charlm.data.datamodule import CharDataModule
from charlm.data.vocab import CharVocab
from charlm.errors import UnknownCharError
from charlm.evaluate import evaluate
from charlm.explain import explain
from charlm.generate import readable, samples
from charlm.models.contract import build_model
from charlm.train import check_config

# enwik8-shaped: XML with multi-byte UTF-8 (é: 2 bytes, 日本: 3 each, 🙂: 4) and CRLF, which bytes keep as is
PAGE = ("<page>\n  <title>Café 日本 🙂</title>\r\n  <text xml:space=\"preserve\">'''Anarchism''' is a "
        "[[political philosophy]] &amp; movement; naïve ¿qué? 1.5 €</text>\n</page>\n")
TINY_RUN = ["trainer=cpu", "logger=none", "trainer.val_check_interval=5", "data.batch_size=4", "data.block_size=16",
            "model.hidden_dim=16", "model.embed_dim=8", "eval.chunk=256", "eval.window_batches=1",
            "sample.n_chars=10", "budget.seconds=null"]


@pytest.fixture(scope="module")
def enwik8_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "enwik8_small"
    path.write_bytes(PAGE.encode("utf-8") * 40)
    return path


def test_raw_bytes_in_nothing_decoded_nul_allowed(tmp_path):
    raw = bytes(range(256)) + b"\x00\x00\r\n\r" + "é".encode()
    path = tmp_path / "blob.bin"
    path.write_bytes(raw)
    vocab, ids = encode_corpus(str(path), unit="byte")
    assert vocab.unit == "byte" and len(vocab) == 256                     # every byte value once, no more
    assert vocab.to_bytes(vocab.decode(ids.tolist())) == raw               # the file's bytes, \r\n untranslated
    again_vocab, again = encode_corpus(str(path), unit="byte")             # the cached copy: the same ids
    assert again_vocab == vocab and torch.equal(again, ids)
    (tmp_path / "t.txt").write_bytes("é\r\n".encode())
    _, chars = encode_corpus(str(tmp_path / "t.txt"))
    assert len(chars) == 2                                                 # char unit: é and one \n


def test_enwik8_split_is_exact_contiguous_and_noted(enwik8_file, capsys):
    data = compose("train", ["data=enwik8", f"data.path={enwik8_file}", "data.block_size=16"]).data
    dm = CharDataModule(**{k: v for k, v in data.items() if k != "_target_"})
    dm.prepare()
    n = enwik8_file.stat().st_size                                         # bytes, not characters
    assert len(dm.vocab) <= 256 and dm.vocab.unit == "byte"
    train, val, test = (len(dm.splits[s]) for s in ("train", "val", "test"))
    assert train == int(n * 9 / 10) and train + val == int(n * 19 / 20) and train + val + test == n
    whole = torch.cat([dm.splits[s] for s in ("train", "val", "test")])
    assert dm.vocab.to_bytes(dm.vocab.decode(whole.tolist())) == enwik8_file.read_bytes()
    assert f"this enwik8 file has {n:,} bytes, not the protocol's 100,000,000" in capsys.readouterr().out


def test_text8_has_27_characters(tmp_path):
    path = tmp_path / "text8_small"
    path.write_text(" anarchism originated as a term of abuse first used against early working class radicals"
                    " the quick brown fox jumps over the lazy dog" * 30)
    data = compose("train", ["data=text8", f"data.path={path}", "data.block_size=16"]).data
    dm = CharDataModule(**{k: v for k, v in data.items() if k != "_target_"})
    dm.prepare()
    assert dm.vocab.unit == "char" and dm.vocab.chars == [" "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def test_bits_per_byte_of_a_uniform_model_is_log2_of_the_vocabulary(enwik8_file, tmp_path):
    vocab, _ = encode_corpus(str(enwik8_file), unit="byte")
    cfg = compose("train", ["model.hidden_dim=8", "model.embed_dim=4"])
    model_cfg = {k: v for k, v in dict(cfg.model).items()}
    model = build_model(model_cfg, len(vocab))
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)                                  # equal logits: p = 1 / V everywhere
    ckpt = save_model(tmp_path / "uniform.ckpt", model, model_cfg, vocab, "lstm")
    out = evaluate(compose("evaluate", [f"ckpt_path={ckpt}", "data=enwik8", f"data.path={enwik8_file}",
                                        "split=test", "eval.window_batches=0", "device=cpu"]))
    V = len(vocab)
    assert out["unit"] == "byte"
    assert out["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert out["bpc"] == pytest.approx(math.log2(V), rel=1e-6)             # bits per byte = nats / ln 2


def test_train_sample_evaluate_resume_in_byte_unit(enwik8_file, tmp_path):
    first = tmp_path / "first"
    # the end-of-run sample reads the prompt's UTF-8 bytes: é is C3 A9 (the byte E9 is not in the corpus), Ã is
    # C3 83 (C3 is, 83 is not: dropped, not an error after the budget is spent), and the result is text
    run_cli("charlm.train", "data=enwik8", f"data.path={enwik8_file}", *TINY_RUN, "trainer.max_steps=10",
            'sample.prompt="Café Ã"', f"hydra.run.dir={first}")
    results = json.loads((first / "results.json").read_text())
    assert results["unit"] == "byte" and results["steps"] == 10
    assert results["sample"].startswith("Café "), results["sample"][:20]   # not the Latin-1 reading "CafÃ©"
    ckpt = first / "checkpoints" / "best.ckpt"

    raw = subprocess.run([sys.executable, "-m", "charlm.sample", f"ckpt_path={ckpt}", "prompt=Caf", "n_chars=30",
                          "raw=true", "seed=1"], capture_output=True, timeout=300)     # bytes, maybe not UTF-8
    shown = run_main("charlm.sample", f"ckpt_path={ckpt}", "prompt=Caf", "n_chars=30", "seed=1")  # in this process
    assert raw.returncode == 0 and raw.stdout.startswith(b"Caf") and shown.stdout.startswith("Caf")
    assert "decoded as UTF-8" in shown.stderr

    out = tmp_path / "eval.json"
    run_main("charlm.evaluate", f"ckpt_path={ckpt}", "data=enwik8", f"data.path={enwik8_file}", "split=test",
             f"json={out}")
    scored = json.loads(out.read_text())
    n = enwik8_file.stat().st_size
    assert scored["unit"] == "byte" and scored["chars_scored"] == n - int(n * 19 / 20) - 1

    second = tmp_path / "second"
    run_cli("charlm.train", "data=enwik8", f"data.path={enwik8_file}", *TINY_RUN, "trainer.max_steps=15",
            f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={second}")
    assert json.loads((second / "results.json").read_text())["steps"] == 15

    text = tmp_path / "chars.txt"
    text.write_text(PAGE * 40, encoding="utf-8")
    proc = run_main("charlm.evaluate", f"ckpt_path={ckpt}", "data=text", f"data.path={text}",
                    f"json={tmp_path / 'no.json'}", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "data.unit=byte" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "no.json").exists()


@pytest.mark.parametrize("args,fragment", [(["data=enwik8"], "data.path"),
                                           (["data=enwik8", "data.path=EMPTY"], "empty")])
def test_refusals_are_one_line(tmp_path, args, fragment):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    run = tmp_path / "run"
    proc = run_main("charlm.train", *[a.replace("EMPTY", str(empty)) for a in args], *TINY_RUN,
                    "trainer.max_steps=2", f"hydra.run.dir={run}", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert fragment in lines[0]
    assert not (run / "results.json").exists() and not (run / "checkpoints").exists()


def test_byte_vocabulary_refuses_values_above_255():
    with pytest.raises(ValueError, match="byte values"):
        CharVocab(["a", "\u0100"], unit="byte")


DATA_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml"))
NEEDS = {"text": ["data.path=FILE"], "enwik8": ["data.path=FILE"], "text8": ["data.path=FILE"],
         "hf": ["data.path=FILE"]}


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_every_data_config_takes_unit_byte(name, enwik8_file):
    overrides = [f"data={name}", "trainer=cpu", *[o.replace("FILE", str(enwik8_file)) for o in NEEDS.get(name, [])]]
    default = compose("train", overrides)
    assert default.data.unit == ("byte" if name == "enwik8" else "char")   # every corpus has a unit, char unless enwik8
    cfg = compose("train", [*overrides, "data.unit=byte"])
    check_config(cfg)                                                       # typed and in range: no refusal
    assert cfg.data.unit == "byte"


@pytest.mark.parametrize("name", ["tinyshakespeare", "recall"])
def test_built_in_corpora_read_as_bytes(name):
    data = compose("train", [f"data={name}", "data.unit=byte"]).data
    dm = get_class(data._target_)(**{k: v for k, v in data.items() if k != "_target_"})
    dm.prepare()
    assert dm.vocab.unit == "byte" and len(dm.vocab) == {"tinyshakespeare": 65, "recall": 25}[name]  # ASCII: as chars


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory, enwik8_file):
    """A tiny untrained LSTM over the PAGE bytes."""
    vocab, _ = encode_corpus(str(enwik8_file), unit="byte")
    model_cfg = dict(compose("train", ["model.hidden_dim=8", "model.embed_dim=4"]).model)
    torch.manual_seed(0)
    model = build_model(model_cfg, len(vocab))
    return save_model(tmp_path_factory.mktemp("byte_model") / "byte.ckpt", model, model_cfg, vocab, "lstm")


def test_samples_read_the_prompt_as_utf8_bytes_and_show_text(byte_ckpt):
    model, vocab, _ = load_model(byte_ckpt)
    g = torch.Generator().manual_seed(0)
    got = samples(model, vocab, "Café Ã", 12, 0.8, generator=g, unknown="skip")[0]
    assert vocab.to_bytes(got)[:7] == b"Caf\xc3\xa9 \xc3" and len(got) == 7 + 12    # 0x83 is not in the vocabulary
    assert readable(vocab, got).startswith("Café ")
    assert readable(vocab, vocab.decode([vocab.stoi["\xc3"]] * 2)) == "\ufffd\ufffd"   # two bytes that do not decode
    with pytest.raises(UnknownCharError):
        samples(model, vocab, "Café Ã", 3, generator=g)                    # unknown=error, as charlm.sample says


def test_sample_cli_takes_a_non_ascii_prompt_for_a_byte_model(byte_ckpt):
    shown = run_main("charlm.sample", f"ckpt_path={byte_ckpt}", "prompt=日本", "n_chars=5", "seed=1")
    assert shown.stdout.startswith("日本")


def test_explain_text_with_a_byte_model_scores_the_utf8_bytes(byte_ckpt, tmp_path):
    model, vocab, _ = load_model(byte_ckpt)
    text = "Café 日本"                                                    # 5 + 1 + 6 bytes, 7 characters
    cfg = compose("explain", [f"ckpt_path={byte_ckpt}", f"out={tmp_path / 'page'}", "device=cpu"])
    OmegaConf.update(cfg, "text", text)
    [t] = explain(cfg)
    ids = torch.tensor([list(text.encode("utf-8"))]).apply_(lambda b: vocab.stoi[chr(b)])   # (1, 12)
    logits, _ = model(ids)                                                  # (1, 12, V): one pass, empty state
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    assert len(t.losses) == 11
    torch.testing.assert_close(torch.as_tensor(t.losses), expected.double(), rtol=1e-5, atol=1e-6)
    ran = run_main("charlm.explain", f"ckpt_path={byte_ckpt}", "text=日本 Café", f"out={tmp_path / 'cli'}")
    assert "bits per byte on 11 bytes" in ran.stdout


def test_explain_refuses_models_of_two_units(byte_ckpt, tmp_path, enwik8_file):
    vocab, _ = encode_corpus(str(enwik8_file))
    model_cfg = dict(compose("train", ["model.hidden_dim=8", "model.embed_dim=4"]).model)
    chars = save_model(tmp_path / "chars.ckpt", build_model(model_cfg, len(vocab)), model_cfg, vocab, "lstm")
    ran = run_main("charlm.explain", f"ckpt_path={byte_ckpt}", f"against={chars}", "text=Café",
                   f"out={tmp_path / 'page'}", check=False)
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == 2 and len(lines) == 1 and "one unit" in lines[0], ran.stderr[-2000:]
    assert not (tmp_path / "page").exists()


@pytest.mark.parametrize("module,arg", [("charlm.train", "sample.prompt=梯度"), ("charlm.train", "data.path=梯度.txt"),
                                        ("charlm.evaluate", "data.path=梯度.txt")])
def test_a_non_ascii_value_unquoted_says_to_quote_it(tmp_path, module, arg):
    run = tmp_path / "run"
    key, value = arg.split("=")
    ran = run_main(module, "ckpt_path=x.ckpt", arg, f"hydra.run.dir={run}", check=False) if module != "charlm.train" \
        else run_main(module, arg, "trainer=cpu", f"hydra.run.dir={run}", check=False)
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == 2 and len(lines) == 1, ran.stderr[-2000:]
    assert lines[0] == f"error: {arg}: a value with non-ASCII characters must be quoted: '{key}=\"{value}\"'"
    assert not run.exists()
    assert compose("train", [f'{key}="{value}"']).get(key.split(".")[0])[key.split(".")[1]] == value  # as it says
