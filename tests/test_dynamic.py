"""Dynamic evaluation (charlm.scoring.dynamic): score-first checked from outside, every character scored once,
every model family, reproducible, the checkpoint untouched, bad input in one line."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_SIZES, run_cli, run_main
from omegaconf import OmegaConf

from charlm.checkpoint import save_model
from charlm.cli import compose
from charlm.data.vocab import CharVocab
from charlm.errors import ConfigError, DivergenceError
from charlm.evaluate import evaluate
from charlm.models.contract import build_model, capabilities
from charlm.scoring import dynamic as dy

FAMILIES = ["rnn", "lstm", "gru", "transformer", "mingru", "mamba"]
SHAKESPEARE = (ROOT / "charlm" / "corpora" / "tinyshakespeare.txt").read_text()


def tiny_cfg(name: str, block_size: int = 16) -> dict:
    """conf/model/NAME.yaml at the tests' tiny sizes (the transformer's window: block_size)."""
    raw = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    for key, value in TINY_SIZES.items():
        if key in raw:
            raw[key] = value
    if "block_size" in raw:
        raw.block_size = block_size
    return OmegaConf.to_container(raw, resolve=True)


def settings(**kw):
    return OmegaConf.structured(dy.DynamicConfig(enabled=True, **kw))


def lstm(V: int, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model({"_target_": "charlm.models.rnn.RNNLM", "cell": "lstm", "embed_dim": 16, "hidden_dim": hidden,
                        "num_layers": 1, "dropout": 0.0}, V).eval()


def second_half(one: dict, two: dict, key: str) -> float:
    """Mean loss over the characters `two` scored after those `one` scored (the same first part)."""
    n1, n2 = one["chars_scored"], two["chars_scored"]
    return (two[key] * n2 - one[key] * n1) / (n2 - n1)


# ---- score first, from outside ------------------------------------------------------------------


def peeking_loss(model, ids, lr: float, segment: int) -> float:
    """What a method that updated on each segment BEFORE scoring it would report (never shipped: the check's
    control, showing the tolerance below catches it)."""
    params = list(model.parameters())
    updater = dy.Updater(params, "sgd", lr, 0.0, 1e-5, None)
    total = n = 0
    state = None
    for x, y, reset in dy.segments(ids, None, segment):
        start = None if reset else state
        model.zero_grad()
        nats, k, _ = dy._segment_loss(model, x, y, start)
        (nats / k).backward()
        updater.step()
        with torch.no_grad():
            nats, k, state = dy._segment_loss(model, x, y, start)
        total, n = total + float(nats), n + k
    updater.restore()
    return total / n


def test_uniformly_random_characters_are_never_predicted_better_than_uniform():
    V, tol = 8, 0.02  # a predictor of iid uniform text reading only the past cannot beat ln V in expectation
    ids = torch.randint(0, V, (3001,), generator=torch.Generator().manual_seed(1))
    train = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(2))
    model = lstm(V)
    for method, lr in [("sgd", 1.0), ("sgd", 3.0), ("rms", 3e-3), ("rms", 1e-2)]:
        out = dy.evaluate_dynamic(model, ids, settings(method=method, lr=lr, decay=0.0, segment=20), train)
        assert out["dynamic_loss"] >= math.log(V) - tol, (method, lr, out["dynamic_loss"])
    assert peeking_loss(model, ids, 3.0, 20) < math.log(V) - 3 * tol  # the check would catch a peeking method


@pytest.fixture(scope="module")
def shakespeare_lstm():
    """A tiny LSTM trained for 300 Adam steps on the first 150k characters of tiny shakespeare, in this process."""
    vocab = CharVocab.from_text(SHAKESPEARE)
    ids = torch.tensor(vocab.encode(SHAKESPEARE[:200_000]))
    model = lstm(len(vocab), hidden=64).train()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        w = ids[torch.randint(0, 150_000, (16,), generator=g)[:, None] + torch.arange(65)]  # (16, 65)
        logits, _ = model(w[:, :-1])                                                       # (16, 64, V)
        loss = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), ids


def test_a_passage_repeated_twice_is_learned_by_its_second_reading(shakespeare_lstm):
    model, ids = shakespeare_lstm
    train, passage, other = ids[:150_000], ids[160_000:160_400], ids[170_000:170_400]
    d = settings(lr=5e-4, decay=0.0, segment=10)
    first = dy.evaluate_dynamic(model, passage, d, train)
    twice = dy.evaluate_dynamic(model, torch.cat([passage, passage]), d, train)
    control = dy.evaluate_dynamic(model, torch.cat([passage, other]), d, train)
    assert twice["dynamic_loss"] < twice["static_loss"] - 0.1
    again_dynamic, again_static = second_half(first, twice, "dynamic_loss"), second_half(first, twice, "static_loss")
    assert again_dynamic < again_static - 0.25                           # the second copy: far below static
    assert again_dynamic < second_half(first, control, "dynamic_loss") - 0.1  # and from the repetition itself


# ---- every character once, every family, weights back ------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_scores_each_character_once_and_gets_its_weights_back(name):
    V = 12
    torch.manual_seed(0)
    model = build_model(tiny_cfg(name), V).eval()
    ids = torch.randint(0, V, (301,), generator=torch.Generator().manual_seed(3))
    train = torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = dy.evaluate_dynamic(model, ids, settings(lr=1e-3, segment=8), train)
    assert out["chars_scored"] == 300                                    # every target of the 301 ids, once
    assert out["protocol"]["kind"] == ("streams" if capabilities(model).context_size is None else "window")
    assert math.isfinite(out["dynamic_loss"]) and out["dynamic_loss"] != out["static_loss"]  # it did update
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])                                # (1, 300, V): whole, from an empty state
        whole = float(F.cross_entropy(logits[0], ids[1:]))
    if capabilities(model).context_size is None:                         # one stream, state carried = whole
        assert out["static_loss"] == pytest.approx(whole, rel=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_a_parameter_subset_adapts_only_those_weights():
    model = lstm(10)
    ids = torch.randint(0, 10, (201,), generator=torch.Generator().manual_seed(5))
    out = dy.evaluate_dynamic(model, ids, settings(method="sgd", params=["head.*"], segment=10))
    assert out["settings"]["adapted_weights"] == sum(p.numel() for p in model.head.parameters())
    with pytest.raises(ConfigError, match="'nothing.*' matches no parameter"):
        dy.evaluate_dynamic(model, ids, settings(method="sgd", params=["nothing.*"]))


# ---- through charlm.evaluate --------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_ckpt(tmp_path_factory):
    """A text file (4,000 chars of tiny shakespeare: val = the last 400) and a tiny untrained LSTM for it."""
    root = tmp_path_factory.mktemp("dynamic")
    text = root / "play.txt"
    text.write_text(SHAKESPEARE[:4000])
    vocab = CharVocab.from_text(SHAKESPEARE[:4000])
    cfg = tiny_cfg("lstm")
    torch.manual_seed(0)
    return text, save_model(root / "tiny.ckpt", build_model(cfg, len(vocab)), cfg, vocab, "lstm")


def run_eval(corpus_ckpt, *args: str) -> dict:
    text, ckpt = corpus_ckpt
    cfg = compose("evaluate", [f"ckpt_path={ckpt}", "data=text", f"data.path={text}", "eval.window_batches=0",
                               "device=cpu", "dynamic.enabled=true", "dynamic.segment=20", *args])
    return evaluate(cfg)


def test_evaluate_reports_both_figures_reproducibly_and_leaves_the_checkpoint_alone(corpus_ckpt, tmp_path):
    _, ckpt = corpus_ckpt
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    few = "dynamic.rms_batches=2"  # a stretch shorter than the training text, so the seed picks where it starts
    a, b = run_eval(corpus_ckpt, "seed=7", few), run_eval(corpus_ckpt, "seed=7", few)
    other = run_eval(corpus_ckpt, "seed=8", few)                         # the RMS statistics from another stretch
    assert a["dynamic_loss"] == b["dynamic_loss"] and a["dynamic"] == b["dynamic"]
    assert other["dynamic_loss"] != a["dynamic_loss"]
    assert a["dynamic"]["chars_scored"] == a["chars_scored"] == 399      # the static yardstick's count
    assert a["dynamic_bpc"] == pytest.approx(a["dynamic_loss"] / math.log(2))
    assert a["dynamic"]["settings"]["lr"] == dy.DEFAULT_LR["rms"] and a["dynamic"]["settings"]["seed"] == 7
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest


def test_tuning_picks_the_grid_minimum_on_the_start_of_val_and_scores_the_rest(corpus_ckpt):
    out = run_eval(corpus_ckpt, "dynamic.tune=true", "dynamic.tune_chars=150", "dynamic.tune_lr=[1e-4,1e-3]",
                   "dynamic.tune_decay=[0,0.1]")
    grid = out["dynamic"]["tuning"]["grid"]
    assert len(grid) == 4 and out["dynamic"]["tuning"]["chars"] == 150
    best = min(grid, key=lambda g: g["loss"])
    assert (out["dynamic"]["settings"]["lr"], out["dynamic"]["settings"]["decay"]) == (best["lr"], best["decay"])
    assert out["dynamic"]["chars_scored"] == 399 - 150                  # val without its tuning part, each once
    test = run_eval(corpus_ckpt, "split=test", "data.val_fraction=0.1", "data.test_fraction=0.1",
                    "dynamic.tune=true", "dynamic.tune_chars=100", "dynamic.method=sgd")
    assert test["dynamic"]["chars_scored"] == test["chars_scored"]       # the whole test split, tuned on val


def test_bytes_work_the_same(tmp_path):
    page = "<page>\n  <title>Café 日本 🙂</title>\r\n  <text>'''Anarchism''' &amp; naïve ¿qué? 1.5 €</text>\n</page>\n"
    path = tmp_path / "enwik8_small"
    path.write_bytes(page.encode() * 40)
    from charlm.data.corpus import encode_corpus

    vocab, _ = encode_corpus(str(path), unit="byte")
    cfg = tiny_cfg("gru")
    ckpt = save_model(tmp_path / "b.ckpt", build_model(cfg, len(vocab)), cfg, vocab, "gru")
    out = evaluate(compose("evaluate", [f"ckpt_path={ckpt}", "data=enwik8", f"data.path={path}", "split=test",
                                        "eval.window_batches=0", "device=cpu", "dynamic.enabled=true"]))
    assert out["unit"] == "byte" and out["dynamic"]["chars_scored"] == out["chars_scored"]
    assert out["dynamic_bpc"] == pytest.approx(out["dynamic_loss"] / math.log(2))


def test_the_command_line_prints_both_and_writes_the_settings(corpus_ckpt, tmp_path):
    text, ckpt = corpus_ckpt
    ran = run_main("charlm.evaluate", f"ckpt_path={ckpt}", "data=text", f"data.path={text}", "dynamic=true",
                   "dynamic.segment=25", "split=all", "context=true", "context_positions=20",
                   f"json={tmp_path / 'e.json'}")  # context: at least 1,045 characters
    saved = json.loads((tmp_path / "e.json").read_text())
    assert "static ->" in ran.stdout and "dynamic" in ran.stdout and "one stream" in ran.stdout
    assert saved["dynamic"]["settings"]["segment"] == 25 and "dynamic_bpc" in saved and "context_use" in saved


@pytest.mark.parametrize("args, message", [
    (["dynamic.segment=400"], "dynamic.segment=400: longer than split=val (399 characters to score)"),
    (["dynamic.tune=true", "split=all"], "dynamic.tune=true with split=all"),
    (["dynamic.method=adam"], "dynamic.method=adam: must be one of rms, sgd"),
    (["dynamic.params=[]"], "dynamic.params=[]"),
    (["dynamic.tune=true", "dynamic.tune_chars=390"], "dynamic.tune_chars=390: leaves 9 of the val split"),
])
def test_bad_input_is_one_line(corpus_ckpt, tmp_path, args, message):
    text, ckpt = corpus_ckpt
    ran = run_main("charlm.evaluate", f"ckpt_path={ckpt}", "data=text", f"data.path={text}", "dynamic=true",
                   f"json={tmp_path / 'e.json'}", *args, check=False)
    assert ran.returncode == 2 and message in ran.stderr, ran.stderr
    assert not (tmp_path / "e.json").exists()


def test_a_negative_lr_ends_in_one_line_before_anything_runs(corpus_ckpt, tmp_path):
    text, ckpt = corpus_ckpt
    ran = run_cli("charlm.evaluate", f"ckpt_path={ckpt}", "data=text", f"data.path={text}", "dynamic=true",
                  "dynamic.lr=-0.1", f"json={tmp_path / 'e.json'}", check=False)
    assert ran.returncode == 2 and ran.stderr.strip() == "error: dynamic.lr=-0.1: must be >= 0 (or null: the " \
                                                         "method's default)"
    assert not (tmp_path / "e.json").exists()


def test_a_diverged_pass_is_one_line_and_a_diverged_grid_point_is_never_chosen(monkeypatch):
    model = lstm(10)
    ids = torch.randint(0, 10, (201,), generator=torch.Generator().manual_seed(7))
    honest = dy.dynamic_pass
    monkeypatch.setattr(dy, "dynamic_pass", lambda m, b, u, device: (math.nan, honest(m, b, u, device)[1])
                        if u.lr > 0.5 else honest(m, b, u, device))  # lr above 0.5 "diverges"
    d = settings(method="sgd", segment=10, tune=True, tune_lr=[0.1, 1.0], tune_decay=[0.0])
    out = dy.evaluate_dynamic(model, ids, d, tune_ids=ids[:101])
    assert out["settings"]["lr"] == 0.1 and out["tuning"]["grid"][1]["loss"] is None
    with pytest.raises(DivergenceError, match="dynamic.lr=1: dynamic evaluation diverged"):
        dy.evaluate_dynamic(model, ids, settings(method="sgd", segment=10, lr=1.0))
    with pytest.raises(DivergenceError, match="every grid point diverged"):
        dy.evaluate_dynamic(model, ids, settings(method="sgd", segment=10, tune=True, tune_lr=[1.0]), tune_ids=ids)


def test_a_segment_longer_than_the_window_is_refused():
    model = build_model(tiny_cfg("transformer", block_size=16), 10).eval()
    ids = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(6))
    with pytest.raises(ConfigError, match="dynamic.segment=20: longer than the window"):
        dy.evaluate_dynamic(model, ids, settings(method="sgd", segment=20))
