"""charlm.explain: the per-character pass matches the yardstick, the page shows what the model
computed, hostile text stays text, bad input is one line, and the gate_trace part of the contract."""

from __future__ import annotations

import functools
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_SIZES, run_cli
from omegaconf import OmegaConf
from torch.utils._pytree import tree_flatten

from charlm.checkpoint import save_model
from charlm.cli import compose
from charlm.data.vocab import CharVocab
from charlm.errors import CharLMError
from charlm.evaluate import evaluate
from charlm.explain import MAX_CHARS, check, explain, trace
from charlm.models.contract import build_model, capabilities

TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n") * 2
HOSTILE = ("To <script>document.body.setAttribute('data-pwned','1')</script></span><img src=x "
           "onerror=\"alert(1)\"> & 'q' &amp; \"x\"\n</div></pre>\n")
VOCAB = CharVocab.from_text(TEXT + HOSTILE)


@functools.lru_cache
def _model_cfg(name: str) -> dict:
    model_cfg = OmegaConf.to_container(compose("train", [f"model={name}", "data.block_size=16"]).model, resolve=True)
    return {**model_cfg, **{k: v for k, v in TINY_SIZES.items() if k in model_cfg}}


def tiny_model(name: str) -> tuple[torch.nn.Module, dict]:
    model_cfg = dict(_model_cfg(name))
    torch.manual_seed(0)
    return build_model(model_cfg, len(VOCAB)).eval(), model_cfg


def write_ckpt(path: Path, name: str) -> Path:
    model, model_cfg = tiny_model(name)
    return save_model(path, model, model_cfg, VOCAB, name)


def explain_cfg(**keys):
    cfg = compose("explain", ["ckpt_path=x"])
    for k, v in keys.items():
        OmegaConf.update(cfg, k, v, force_add=False)
    return cfg


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_losses_sum_to_evaluates_total(tmp_path, name):
    """The page's per-character losses are the yardstick's: evaluate eval.streams=1 on the same text."""
    ckpt = write_ckpt(tmp_path / "m.ckpt", name)
    (tmp_path / "t.txt").write_text(TEXT)
    ev = evaluate(compose("evaluate", [f"ckpt_path={ckpt}", f"data.path={tmp_path / 't.txt'}", "split=all",
                                       "eval.streams=1", "eval.chunk=64", "eval.window_batches=0", "device=cpu"]))
    model, _ = tiny_model(name)
    t = trace(model, VOCAB, TEXT, "A", chunk=64)
    assert len(t.losses) == len(TEXT) - 1 == ev["chars_scored"]
    assert math.isclose(t.losses.sum(), ev["loss"] * ev["chars_scored"], rel_tol=1e-6)
    if name == "lstm":  # a recurrent model with the state carried is one whole forward pass
        ids = torch.tensor(VOCAB.encode(TEXT))
        logits, _ = model(ids[None, :-1])
        whole = F.cross_entropy(logits[0], ids[1:], reduction="none").detach().double().numpy()
        np.testing.assert_allclose(t.losses, whole, rtol=1e-5, atol=1e-6)


def _page_data(html: str) -> dict:
    start = html.index('<script type="application/json" id="explain-data">') + len(
        '<script type="application/json" id="explain-data">')
    return json.loads(html[start : html.index("</script>", start)])


def test_top5_sorted_first_is_argmax_and_real_probability_is_exp_minus_loss(tmp_path):
    ckpt = write_ckpt(tmp_path / "m.ckpt", "lstm")
    explain(explain_cfg(ckpt_path=str(ckpt), text=TEXT, out=str(tmp_path / "o"), device="cpu"))
    data = _page_data((tmp_path / "o" / "explain.html").read_text())
    m = data["models"][0]
    assert "".join(data["text"]) == TEXT
    model, _ = tiny_model("lstm")
    ids = torch.tensor(VOCAB.encode(TEXT))
    probs = model(ids[None, :-1])[0][0].detach().softmax(-1)                     # (n-1, V)
    for t in range(len(TEXT) - 1):
        top_p = m["top_p"][t]
        assert len(top_p) == 5 and top_p == sorted(top_p, reverse=True)
        assert m["chars"][m["top"][t][0]] == VOCAB.chars[int(probs[t].argmax())]
        assert m["p"][t] == pytest.approx(math.exp(-m["loss"][t]), abs=2e-6)
        assert m["p"][t] == pytest.approx(float(probs[t, ids[t + 1]]), abs=1e-5)


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.views, self._in = [], set(), {}, None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        self.attrs.update(attrs and [k for k, _ in attrs])
        if tag == "div" and a.get("data-view"):
            self.views[a["data-view"]] = []
        if tag == "span" and "c" in (a.get("class") or "").split():
            self._in = list(self.views)[-1]
            self.views[self._in].append("")

    def handle_endtag(self, tag):
        if tag == "span":
            self._in = None

    def handle_data(self, data):
        if self._in:
            self.views[self._in][-1] += data


def test_hostile_text_is_shown_and_inert(tmp_path):
    a, b = write_ckpt(tmp_path / "a.ckpt", "lstm"), write_ckpt(tmp_path / "b.ckpt", "transformer")
    explain(explain_cfg(ckpt_path=str(a), against=str(b), text=HOSTILE, out=str(tmp_path / "o"), device="cpu"))
    html = (tmp_path / "o" / "explain.html").read_text()
    p = Tags()
    p.feed(html)
    made = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "br", "b", "div", "span",
            "i", "table", "tr", "th", "td", "script"}
    assert set(p.tags) <= made and "img" not in p.tags
    assert p.tags.count("script") == 2                                    # the data and the page's own script
    assert not {"onerror", "src", "data-pwned"} & p.attrs
    shown = HOSTILE.replace("\n", "\u21b5")
    for view in ("A", "B", "D"):
        assert len(p.views[view]) == len(HOSTILE) and "".join(p.views[view]) == shown
    assert "".join(_page_data(html)["text"]) == HOSTILE


def test_bad_checkpoint_is_one_line_exit_2_nothing_written(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    out = tmp_path / "o"
    r = run_cli("charlm.explain", f"ckpt_path={tmp_path / 'bad.ckpt'}", f"out={out}", check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not a loadable checkpoint" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("keys, says", [
    ({"text": "x" * (MAX_CHARS + 1)}, "20,000"),
    ({"n_chars": MAX_CHARS + 1}, "20,000"),
    ({"split": "dev"}, "split=dev"),
    ({"start": -1}, "start=-1"),
    ({"text": "ROMEO", "start": 4}, "nothing to score"),
    ({"text": "R\u265e\u265e"}, "\u265e"),
    ({"text": "R\u265e\u265e", "unknown": "skip"}, "nothing to score"),
    ({"data.val_fraction": "a tenth"}, "data.val_fraction"),
    ({"data.errors": "ignore"}, "data.errors=ignore"),
])
def test_bad_input_names_the_problem_and_writes_nothing(tmp_path, keys, says):
    ckpt = write_ckpt(tmp_path / "m.ckpt", "lstm")
    cfg = explain_cfg(ckpt_path=str(ckpt), out=str(tmp_path / "o"), device="cpu", **keys)
    with pytest.raises(CharLMError, match=says):
        check(cfg)
        explain(cfg)
    assert not (tmp_path / "o").exists()


def test_unknown_skip_drops_and_explains(tmp_path):
    ckpt = write_ckpt(tmp_path / "m.ckpt", "lstm")
    traces = explain(explain_cfg(ckpt_path=str(ckpt), text="ROMEO\u265e: But", unknown="skip",
                                 out=str(tmp_path / "o"), device="cpu"))
    assert len(traces[0].losses) == len("ROMEO: But") - 1 and (tmp_path / "o" / "explain.png").stat().st_size


def test_gate_trace_default_is_no_gates_and_the_forward_state():
    model, _ = tiny_model("transformer")
    idx = torch.randint(0, len(VOCAB), (2, 9))
    gates, state = capabilities(model).gate_trace(idx)
    assert gates == {}
    want, _ = tree_flatten(model(idx)[1])
    got, _ = tree_flatten(state)
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("name", ["lstm", "mingru", "gru_tanh_out"])
def test_gate_trace_chunked_equals_whole(name):
    model, _ = tiny_model(name)
    hook = capabilities(model).gate_trace
    idx = torch.randint(0, len(VOCAB), (2, 11))
    whole, _ = hook(idx)
    a, s = hook(idx[:, :4])
    b, _ = hook(idx[:, 4:], s)
    assert whole and set(whole) == set(a) == set(b)
    for k in whole:
        assert whole[k].shape == (2, 11)
        torch.testing.assert_close(torch.cat([a[k], b[k]], 1), whole[k], atol=1e-5, rtol=1e-5)
        assert float(whole[k].min()) >= 0 and float(whole[k].max()) <= 1
    if name == "lstm":  # the first step from an empty state, by hand: f = sigmoid(W_if x + b_if + b_hf)
        H = model.rnn.hidden_size
        x = model.embed(idx[:, 0])
        rnn, f = model.rnn, slice(H, 2 * H)
        pre = x @ rnn.weight_ih_l0[f].T + rnn.bias_ih_l0[f] + rnn.bias_hh_l0[f]
        torch.testing.assert_close(whole["layer0/forget"][:, 0], torch.sigmoid(pre).mean(-1))


@pytest.mark.slow
def test_train_writes_the_page_into_the_run_folder(tmp_path):
    run_cli("charlm.train", *TINY, "trainer.max_steps=3", "trainer.val_check_interval=3", "explain.n_chars=120",
            f"hydra.run.dir={tmp_path}")
    html = (tmp_path / "explain.html").read_text()
    assert len(_page_data(html)["text"]) == 120 and (tmp_path / "explain.png").stat().st_size > 0


def test_explain_imports_no_lightning():
    import subprocess
    import sys

    code = "import sys, charlm.explain; sys.exit('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # it runs where only torch is installed
    # nor does checking a config that reads the embedded corpus (the data module's class brings Lightning)
    code = ("import sys; from charlm.cli import compose; from charlm.explain import check; "
            "check(compose('explain', ['ckpt_path=x.ckpt', 'split=val'])); sys.exit('lightning' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
