"""Units inside a model (charlm.explain units.*, charlm.scoring.units): a hand-built GRU whose unit 3 is
"inside double quotes" is found at r ~ 1, holding a unit the output ignores changes nothing while holding
unit 3 costs, the contract's unit_trace / hold_units for every family, bad input is one line, and the units
view of a hostile text stays text."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_explain import HOSTILE, VOCAB, Tags, explain_cfg, tiny_model, write_ckpt

from charlm.checkpoint import save_model
from charlm.cli import compose
from charlm.data.vocab import CharVocab
from charlm.errors import CharLMError
from charlm.explain import check, explain, quote_args
from charlm.models.contract import capabilities
from charlm.models.rnn import RNNLM
from charlm.scoring.units import correlations, target

random.seed(0)
QUOTED = "".join(f'"{"".join(random.choices("XYZ", k=random.randint(1, 6)))}" '
                 f'{"".join(random.choices("abc ", k=random.randint(2, 9)))} ' for _ in range(40))
QVOCAB = CharVocab.from_text(QUOTED + "!")
H = 8
IGNORED = 5  # a unit with input but read by nothing: not the head, not another unit


def quote_gru() -> RNNLM:
    """A GRU (cuDNN) set by hand: unit 3 is +1 from an opening `"` up to its closing one and -1 after it;
    the head reads unit 3 to tell capitals (inside) from small letters (outside); unit 5 moves and is ignored."""
    V = len(QVOCAB)
    model = RNNLM(V, cell="gru", embed_dim=V, hidden_dim=H).eval()
    g = torch.Generator().manual_seed(0)
    q = QVOCAB.stoi['"']
    rnn = model.rnn
    r, z = slice(0, H), slice(H, 2 * H)                           # PyTorch's GRU gate layout: r, z, n
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight.copy_(torch.eye(V))                    # one-hot characters
        rnn.bias_ih_l0[r] = 10.0                                  # reset gates open: n reads h
        rnn.bias_ih_l0[z] = 20.0                                  # every unit keeps its h ...
        rnn.weight_ih_l0[H + 3, q] = -40.0                        # ... but unit 3 takes n at a quote
        rnn.weight_ih_l0[2 * H + 3, q] = 2.0                      # n = tanh(2 - 6 h3): flips h3's sign
        rnn.weight_hh_l0[2 * H + 3, 3] = -6.0
        for u in (0, 1, 2, 4, 5, 6, 7):                           # noise units: n from the character alone
            rnn.bias_ih_l0[H + u] = 0.0
            rnn.weight_ih_l0[2 * H + u] = torch.randn(V, generator=g)
        upper = [QVOCAB.stoi[c] for c in "XYZ"]
        lower = [QVOCAB.stoi[c] for c in "abc"]
        model.head.weight[upper, 3], model.head.weight[lower, 3] = 4.0, -4.0
        model.head.bias[[q, QVOCAB.stoi[" "]]] = 2.0
        noise = torch.randn(V, H, generator=g) * 0.1
        noise[:, [3, IGNORED]] = 0.0
        model.head.weight += noise
    return model


def quote_ckpt(path):
    V = len(QVOCAB)
    cfg = {"_target_": "charlm.models.rnn.RNNLM", "cell": "gru", "embed_dim": V, "hidden_dim": H, "num_layers": 1,
           "dropout": 0.0, "tie_weights": False}
    return save_model(path, quote_gru(), cfg, QVOCAB, "quote-gru")


def run(tmp_path, text=QUOTED, **units):
    cfg = explain_cfg(ckpt_path=str(quote_ckpt(tmp_path / "q.ckpt")), text=text, out=str(tmp_path / "o"),
                      device="cpu", **{f"units.{k}": v for k, v in units.items()})
    check(cfg)
    return explain(cfg)[0].units


# ---- find, show, ablate -------------------------------------------------------------------------------


def test_the_quote_unit_is_found_at_r_near_1_and_written_beside_the_page(tmp_path):
    found = run(tmp_path, find="quote", top=3)
    best = found.top[0]
    assert (best.layer, best.unit) == ("layer0/h", 3) and best.r > 0.99
    assert all(abs(t.r) < 0.9 for t in found.top[1:])
    written = json.loads((tmp_path / "o" / "units.json").read_text())
    assert written["units"][0] == {"layer": "layer0/h", "unit": 3, "corr": pytest.approx(best.r, abs=1e-6)}
    assert "ablation" not in written
    html = (tmp_path / "o" / "explain.html").read_text()
    assert 'title="layer0/h:3: r = +' in html and html.count('class="strip"') == 3 * (QUOTED.count("\n") + 1)


def test_holding_an_ignored_unit_changes_nothing_and_holding_unit_3_costs(tmp_path):
    model = quote_gru()
    ids = torch.tensor([QVOCAB.encode(QUOTED)])
    acts, _ = capabilities(model).unit_trace(ids)
    assert float(acts["layer0/h"][0, :, IGNORED].abs().mean()) > 0.1       # the ignored unit does move
    ignored = run(tmp_path, ablate=[IGNORED]).ablation
    assert ignored.units == ["layer0/h:5"] and ignored.bpc == pytest.approx(ignored.bpc_base, abs=1e-6)
    assert np.abs(ignored.cost).max() < 1e-5
    needed = run(tmp_path, ablate=["0:3"], ablate_to="zero").ablation
    assert needed.bpc > needed.bpc_base + 0.3                             # case is guessed without unit 3
    written = json.loads((tmp_path / "o" / "units.json").read_text())["ablation"]
    assert written["units"] == ["layer0/h:3"] and written["bpc"] > written["bpc_base"] + 0.3
    assert "held at zero" in (tmp_path / "o" / "explain.html").read_text()


def test_targets_by_hand():
    assert target("quote", 'a"bc"d').tolist() == [0, 1, 1, 1, 0, 0]
    assert target("quote", "a\u201cb\u201dc").tolist() == [0, 1, 1, 0, 0]
    assert target("bracket", "a(b[c])d").tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
    assert target("line", "ab\nc\n").tolist() == [0, 1, 2, 0, 1]
    assert target("caps", "ROMEO:\nHi, Sir:\nKING JOHN:\n").tolist() == [1] * 5 + [0] * 11 + [1] * 9 + [0, 0]
    assert target("[0-9]+", "a12b3").tolist() == [0, 1, 1, 0, 1]


def test_correlation_is_pearsons_r():
    y = np.array([0, 0, 1, 1, 0, 1.0])
    x = np.stack([y * 2 - 1, -y, np.ones(6), np.array([1, 2, 3, 4, 5, 6.0])], 1)     # (n, 4)
    r = correlations(x, y)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and r[2] == 0.0
    assert r[3] == pytest.approx(np.corrcoef(x[:, 3], y)[0, 1])


# ---- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("units, says", [
    ({"find": "[unclosed"}, "not a regular expression"),
    ({"find": "bracket"}, "no bracket in the"),
    ({"find": "Q+"}, "matches nothing"),
    ({"find": "quote", "layer": 1}, "units.layer=1: the model's layers are 0"),
    ({"ablate": ["0:8"]}, "layer0/h has 8 units"),
    ({"ablate": ["2:1"]}, "no layer 2"),
    ({"ablate": ["x"]}, "layer:unit"),
    ({"find": "quote", "source": "c"}, "units.source=c: the model offers h"),
    ({"find": "quote", "top": 17}, "units.top=17"),
    ({"ablate": [1], "ablate_to": "one"}, "units.ablate_to=one"),
])
def test_bad_units_name_the_problem_and_write_nothing(tmp_path, units, says):
    with pytest.raises(CharLMError, match=says):
        run(tmp_path, **units)
    assert not (tmp_path / "o").exists()


def test_bad_units_on_the_command_line_are_one_line_exit_2(tmp_path):
    ckpt = quote_ckpt(tmp_path / "q.ckpt")
    for arg, says in (("units.find=(a", "not a regular expression"), ("units.ablate=[3:1]", "no layer 3")):
        r = run_cli("charlm.explain", f"ckpt_path={ckpt}", "text=ab \"XY\" c", f"out={tmp_path / 'o'}", arg,
                    check=False)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("regex", [r"\d+\s", r'"[^"]*"', "'a'", "x\\", "(?m)^[A-Z]+:$", "[a-z]{2,}"])
def test_a_regex_reaches_the_config_verbatim(regex):
    cfg = compose("explain", ["ckpt_path=x", *quote_args([f"units.find={regex}"])])
    assert cfg.units.find == regex


def test_hostile_text_in_the_units_view_stays_text(tmp_path):
    ckpt = write_ckpt(tmp_path / "a.ckpt", "lstm")
    cfg = explain_cfg(ckpt_path=str(ckpt), text=HOSTILE, out=str(tmp_path / "o"), device="cpu",
                      **{"units.find": "<script>[^<]*", "units.top": 2, "units.ablate": [1]})
    check(cfg)
    explain(cfg)
    html = (tmp_path / "o" / "explain.html").read_text()
    p = Tags()
    p.feed(html)
    assert "img" not in p.tags and p.tags.count("script") == 2
    assert not {"onerror", "src", "data-pwned"} & p.attrs
    shown = HOSTILE.replace("\n", "\u21b5")
    for view in ("U",):                                           # the units view, with the ablation strip
        assert "".join(p.views[view]) == shown
    assert "tracking &lt;script&gt;" in html and 'with &lt;script&gt;[^&lt;]*"' in html  # heading, strip titles


# ---- the contract: unit_trace and hold_units ----------------------------------------------------------

FAMILIES = ["rnn", "lstm", "gru", "gru_tanh_out", "gru_single_gate", "birnn", "mingru", "minlstm", "hawk", "mamba",
            "transformer", "slstm", "mlstm", "xlstm"]


@pytest.mark.parametrize("name", FAMILIES)
def test_unit_trace_chunked_equals_whole_and_hold_fixes_the_unit(name):
    model, _ = tiny_model(name)
    caps = capabilities(model)
    idx = torch.randint(0, len(VOCAB), (2, 40), generator=torch.Generator().manual_seed(0))
    whole, _ = caps.unit_trace(idx)
    a, s = caps.unit_trace(idx[:, :13])
    b, _ = caps.unit_trace(idx[:, 13:], s)
    assert "layer0/h" in whole and set(whole) == set(a) == set(b)
    for k, x in whole.items():
        assert x.shape[:2] == (2, 40)
        torch.testing.assert_close(torch.cat([a[k], b[k]], 1), x, atol=1e-5, rtol=1e-5)
    logits, _ = model(idx)
    with caps.hold_units({}):                                        # nothing held: the same logits
        torch.testing.assert_close(model(idx)[0], logits, atol=1e-5, rtol=1e-5)
    with caps.hold_units({"layer0/h": {3: 0.25}}):
        held, _ = caps.unit_trace(idx)
        changed = model(idx)[0]
    assert torch.all(held["layer0/h"][..., 3] == 0.25)
    assert float((changed - logits).abs().max()) > 1e-4               # what reads the unit saw 0.25
    with pytest.raises(KeyError):
        with caps.hold_units({"layer9/h": {0: 0.0}}):
            pass


def test_lstm_trace_has_h_and_c_that_match_the_cudnn_state():
    model = RNNLM(len(VOCAB), cell="lstm", embed_dim=8, hidden_dim=12, num_layers=2).eval()
    idx = torch.randint(0, len(VOCAB), (3, 17))
    acts, state = capabilities(model).unit_trace(idx)
    out, (h, c) = model.rnn(model.embed(idx))
    assert set(acts) == {"layer0/h", "layer0/c", "layer1/h", "layer1/c"}
    torch.testing.assert_close(acts["layer1/h"], out)
    for k in range(2):
        torch.testing.assert_close(acts[f"layer{k}/h"][:, -1], h[k])
        torch.testing.assert_close(acts[f"layer{k}/c"][:, -1], c[k])
    torch.testing.assert_close(state[1], c)
    with capabilities(model).hold_units({"layer0/c": {2: 0.0}}):     # c held: h reads the held c
        held, _ = capabilities(model).unit_trace(idx)
    assert torch.all(held["layer0/c"][..., 2] == 0)
    assert not torch.allclose(held["layer1/h"], acts["layer1/h"])


class PlainLM(torch.nn.Module):
    """A model that declares nothing of the optional contract."""

    def __init__(self, V: int):
        super().__init__()
        self.embed, self.mix, self.head = torch.nn.Embedding(V, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, V)

    def forward(self, idx, state=None):
        return self.head(torch.tanh(self.mix(self.embed(idx)))), state


def test_the_default_traces_and_holds_what_the_output_layer_reads():
    model = PlainLM(len(VOCAB))
    idx = torch.randint(0, len(VOCAB), (2, 5))
    caps = capabilities(model)
    acts, _ = caps.unit_trace(idx)
    torch.testing.assert_close(acts["layer0/h"], torch.tanh(model.mix(model.embed(idx))))
    with caps.hold_units({"layer0/h": {1: 0.5}}):
        logits, _ = model(idx)
    x = torch.tanh(model.mix(model.embed(idx)))
    x[..., 1] = 0.5
    torch.testing.assert_close(logits, model.head(x))


# ---- the report's study -------------------------------------------------------------------------------


def test_study_finds_the_quote_unit_and_says_what_the_text_lacks():
    from charlm.studies.units import markdown, study_model

    m = study_model(quote_gru(), QVOCAB, QUOTED, ["quote", "caps"], "mean", 64, "auto")
    quote, caps = m["patterns"]["quote"], m["patterns"]["caps"]
    assert (quote["layer"], quote["unit"]) == ("layer0/h", 3) and quote["r"] > 0.99 and m["units"] == H
    assert quote["bpc"] > quote["bpc_base"] + 0.3                          # held at its mean, case is lost
    assert caps == {"absent": f"no speaker name in capitals in the {len(QUOTED):,} characters explained"}
    md = "\n".join(markdown({"ablate_to": "mean", "models": {"quote-gru": {"steps": 0, **m}}}))
    row = rf"\| quote-gru \| 0 \| {len(QUOTED):,} \| quote \| layer0/h:3 of 8 \| \+(0\.99\d|1\.000) \|"
    assert re.search(row, md), md
    assert "- caps: not measurable" in md and "- a unit at |r| >= 0.3: quote-gru quote (+" in md


def test_study_on_the_tiny_preset_writes_its_figure_and_json(tmp_path):
    from charlm.studies.units import markdown, units_study

    cfg = compose("report", ["size=tiny", "device=cpu"])
    study = units_study(cfg, cfg.presets.tiny, tmp_path)
    written = json.loads((tmp_path / "units.json").read_text())
    assert list(written["models"]) == ["lstm", "gru"] and (tmp_path / "units.png").stat().st_size > 0
    for m in written["models"].values():
        assert m["chars"] == 600 and "no double quote" in m["patterns"]["quote"]["absent"]
        for p in ("line", "caps"):
            assert -1 <= m["patterns"][p]["r"] <= 1 and len(m["patterns"][p]["values"]) == 240
    assert "## Units that track the text" in "\n".join(markdown(study))


def test_a_stack_names_layers_and_sources(tmp_path):
    model = RNNLM(len(VOCAB), cell="lstm", embed_dim=8, hidden_dim=12, num_layers=2).eval()
    cfg = {"_target_": "charlm.models.rnn.RNNLM", "cell": "lstm", "embed_dim": 8, "hidden_dim": 12, "num_layers": 2}
    ckpt = save_model(tmp_path / "s.ckpt", model, cfg, VOCAB, "stack")

    def units(**keys):
        c = explain_cfg(ckpt_path=str(ckpt), text="ROMEO:\nBut soft!\nJULIET:\nO Romeo.\n" * 3,
                        out=str(tmp_path / "o"), device="cpu", **{f"units.{k}": v for k, v in keys.items()})
        check(c)
        return explain(c)[0].units

    assert {t.layer for t in units(find="caps", top=5, layer=1).top} == {"layer1/h"}
    assert {t.layer for t in units(find="caps", top=16, source="c").top} <= {"layer0/c", "layer1/c"}
    with pytest.raises(CharLMError, match=r"units.ablate=3: the model has layers 0, 1; write layer:unit"):
        units(ablate=[3])
    assert units(ablate=["1:3"], source="c").ablation.units == ["layer1/c:3"]
