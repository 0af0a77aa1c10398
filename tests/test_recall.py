"""The recall task (stream, curriculum, uniform positions), its probe (chance beyond a window, perfect for
an oracle), the forget-gate helpers, the gate hook, and the report's tiny preset end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from hydra.utils import instantiate
from torch import nn

from charlm.models.contract import capabilities
from charlm.models.transformer import GPT
from charlm.studies.gradflow import model_config
from charlm.studies.probe import gradient_vs_forget, lag_accuracy, lstm_forget_gates, probe_rows, span
from charlm.studies.recall import SYMBOLS, RecallDataModule, Task, lag_cap, recall_vocab

CONF = Path(__file__).resolve().parents[1] / "conf"
VOCAB = recall_vocab(4, 3)  # symbols A-D, store tokens a-d, fillers ".-,", the cue "?"
TASK = Task(VOCAB, n_symbols=4, n_fillers=3, p_distract=0.25, max_gap=4, min_lag=0, lag_dist="log")
EPISODE = re.compile(r"([a-d])([A-D.,-]*)\?([A-D])")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and two threads beside another busy process crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_of(ids) -> str:
    return VOCAB.decode(np.asarray(ids).tolist())


# ---- the stream ---------------------------------------------------------------------------


def test_stream_is_noise_and_whole_episodes():
    text = text_of(TASK.stream(np.random.default_rng(0), 20000, max_lag=12))
    episodes = EPISODE.findall(text)
    assert len(episodes) > 300
    assert all(answer == store.upper() for store, _, answer in episodes)
    assert sum(c in "abcd" for c in text) == text.count("?") == len(episodes)  # every store closes
    assert {len(noise) for _, noise, _ in episodes} == set(range(13))  # lags 0..12 all occur
    assert {s for s, _, _ in episodes} == set("abcd")
    rest = EPISODE.sub("", text)
    assert set(rest) <= set("ABCD.,-")
    distractors = sum(c in "ABCD" for c in rest) / len(rest)
    assert 0.2 < distractors < 0.3                                 # p_distract = 0.25 in the gaps too
    lag_noise = "".join(n for _, n, _ in episodes)
    assert 0.2 < sum(c in "ABCD" for c in lag_noise) / len(lag_noise) < 0.3


def test_curriculum_caps_the_lags():
    assert [lag_cap(k, 512, 100, 4) for k in (0, 100, 500)] == [4, 512, 512]
    caps = [lag_cap(k, 512, 100, 4) for k in range(101)]
    assert caps == sorted(caps) and 20 < caps[50] < 60             # geometric: sqrt(5 * 513) - 1 ~ 50
    assert lag_cap(0, 512, 0, 4) == 512                            # no curriculum
    dm = RecallDataModule(n_symbols=4, n_fillers=3, max_lag=200, max_gap=4, curriculum_steps=1000,
                          curriculum_start=3, n_chars=3000, block_size=64, batch_size=8, sampling="stream")
    dm.prepare()
    x = next(iter(dm.train_dataloader()))[0]
    lags = [len(n) for row in x for _, n, _ in EPISODE.findall(text_of(row))]
    assert lags and max(lags) <= 3
    assert not any(c in "ABCD" for row in x for c in EPISODE.sub("", text_of(row)))  # no distractors yet
    late = next(iter(dm.train_dataset(start=2000)))[0]               # past the ramp: p_distract 0.25
    assert 0.15 < float(torch.isin(late, torch.from_numpy(dm.task.symbols)).float().mean()) < 0.3


@pytest.mark.parametrize("sampling", ["stream", "random"])
def test_batches_replay_and_continue(sampling):
    dm = RecallDataModule(n_symbols=4, n_fillers=3, max_lag=20, n_chars=3000, block_size=16, batch_size=4,
                          curriculum_steps=10, sampling=sampling)
    dm.prepare()
    it = iter(dm.train_dataset(0))
    batches = [next(it) for _ in range(6)]
    resumed = next(iter(dm.train_dataset(4)))
    assert torch.equal(resumed.x, batches[4].x) and torch.equal(resumed.y, batches[4].y)
    assert batches[0].reset and batches[1].reset == resumed.reset == (sampling == "random")
    assert torch.equal(batches[2].x[:, 1:], batches[2].y[:, :-1])
    if sampling == "stream":  # row b of batch k+1 continues row b of batch k
        assert torch.equal(batches[3].x[:, 0], batches[2].y[:, -1])


@pytest.mark.parametrize("sampling", ["stream", "random"])
def test_symbol_position_in_a_window_is_uniform(sampling):
    """Chi-square over the 16 positions of a window, for the store tokens in 500 batches of 8 windows."""
    dm = RecallDataModule(n_symbols=4, n_fillers=3, max_lag=12, max_gap=4, n_chars=3000, block_size=16,
                          batch_size=8, sampling=sampling, seed=3)
    dm.prepare()
    it = iter(dm.train_dataloader())
    counts = torch.zeros(16)
    for _ in range(500):
        x = next(it)[0]
        counts += torch.isin(x, torch.from_numpy(dm.task.stores)).sum(0)
    expected = counts.sum() / 16
    assert expected > 200
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.70, (chi2, counts.tolist())                   # chi-square(15 dof) at p = 0.001


# ---- the probe ----------------------------------------------------------------------------


class Oracle(nn.Module):
    """Answers the symbol of the last store token it has seen (state carried), "A" before any;
    `wrong_for`: the one symbol it answers as the next one instead."""

    def __init__(self, vocab, context_size=None, wrong_for=None):
        super().__init__()
        self.vocab, self.context_size = vocab, context_size
        self.sym = [vocab.stoi[c] for c in SYMBOLS if c in vocab.stoi]
        self.store = {vocab.stoi[c.lower()]: vocab.stoi[c] for c in SYMBOLS if c in vocab.stoi}
        self.wrong = vocab.stoi[wrong_for] if wrong_for else None
        self.embed = nn.Embedding(len(vocab), 1)

    def forward(self, idx, state=None):
        out = torch.zeros(*idx.shape, len(self.vocab))
        last = [self.sym[0]] * len(idx) if state is None else list(state)
        for r, row in enumerate(idx.tolist()):
            for t, i in enumerate(row):
                last[r] = self.store.get(i, last[r])
                answer = self.sym[(self.sym.index(last[r]) + 1) % len(self.sym)] if last[r] == self.wrong else last[r]
                out[r, t, answer] = 1.0
        return out, last


def test_probe_rows_format():
    x, answers = probe_rows(TASK, lag=7, n=50, seed=0, prefix=20)
    assert x.shape == (50, 20 + 7 + 2)
    for row, a in zip(x, answers):
        text = text_of(row)
        assert re.fullmatch(r"[A-Da-d.,?-]{20}[a-d][A-D.,-]{7}\?", text), text
        assert text[20] == VOCAB.chars[a].lower()
    assert len({text_of(r[:20]) for r in x}) == 50                 # the prefixes differ


def test_oracle_recalls_at_every_lag_and_a_window_cuts_it_off():
    for lag in (0, 5, 60):
        assert lag_accuracy(Oracle(VOCAB), TASK, lag, n=100, prefix=16) == 1.0
    windowed = Oracle(VOCAB, context_size=16)
    assert lag_accuracy(windowed, TASK, 14, n=100, prefix=16) == 1.0  # s + 14 + "?" = 16: the window
    acc = lag_accuracy(windowed, TASK, 15, n=400, prefix=16)         # s just outside: chance, 1/4
    assert abs(acc - 0.25) < 0.08, acc


def test_a_transformer_is_at_chance_beyond_its_window():
    torch.manual_seed(0)
    model = GPT(len(VOCAB), block_size=16, n_layer=1, n_head=2, n_embd=16)
    dm = RecallDataModule(n_symbols=4, n_fillers=3, max_lag=8, max_gap=4, n_chars=3000, block_size=16,
                          batch_size=32, sampling="random")
    dm.prepare()
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _, batch in zip(range(40), dm.train_dataloader()):
        loss = F.cross_entropy(model(batch.x)[0].flatten(0, 1), batch.y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert capabilities(model).context_size == 16
    for lag in (20, 50):
        acc = lag_accuracy(model, dm.task, lag, n=400, seed=1, prefix=8)
        assert abs(acc - 0.25) < 0.08, (lag, acc)


def test_span_reads_the_ladder():
    lags = [0, 1, 2, 4, 8]
    acc = [1.0, 0.95, 0.8, 0.6, 0.3]
    assert span(lags, acc, 0.9) == 1 and span(lags, acc, 0.5) == 4 and span(lags, acc, 0.2) == 8
    assert span(lags, [0.4, 0.95, 1, 1, 1], 0.5) is None
    assert span(lags, [1, 0.3, 1, 1, 1], 0.5) == 0                  # stops at the first failure
    assert span(lags, [1, float("nan"), 1, 1, 1], 0.5) == 0


def test_recall_accuracy_callback_counts_cues_with_state_carried():
    from charlm.training.module import CharLM

    dm = RecallDataModule(n_symbols=4, n_fillers=3, max_lag=10, n_chars=2400, block_size=32, sampling="stream")
    dm.prepare()
    dm.configure_eval(context_size=None, streams=1, chunk=32)
    module = CharLM(model={"_target_": "charlm.models.rnn.RNNLM", "cell": "rnn", "embed_dim": 4, "hidden_dim": 4},
                    vocab=dm.vocab.to_dict(), sample={"n_chars": 0})
    module.model = Oracle(dm.vocab, wrong_for="C")
    trainer = L.Trainer(logger=False, callbacks=dm.callbacks(), accelerator="cpu", enable_progress_bar=False)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    text = dm.vocab.decode(dm.splits["val"].tolist())
    right = total = 0
    for m in re.finditer(r"\?(.)", text):  # expected from the text: right unless the answer is C
        seen = any(c in "abcd" for c in text[: m.start()])          # a store token before this cue
        total += 1
        right += (m.group(1) != "C") if seen else (m.group(1) == "A")
    assert total > 40
    assert metrics["val/recall_acc"] == pytest.approx(right / total)


# ---- gates --------------------------------------------------------------------------------


def test_lstm_forget_gates_obey_the_cell_recursion():
    """c_t = f_t * c_{t-1} + i_t * g_t, with c_t from nn.LSTM run step by step and i, g from its weights:
    holds for the f the helper returns (a wrong gate slice breaks it), in both layers."""
    from charlm.models.rnn import RNNLM

    torch.manual_seed(0)
    model = RNNLM(len(VOCAB), cell="lstm", embed_dim=6, hidden_dim=5, num_layers=2)
    idx = torch.randint(0, len(VOCAB), (3, 9))
    gates = lstm_forget_gates(model, idx)
    assert [tuple(f.shape) for f in gates] == [(3, 9, 5)] * 2
    lstm, H = model.rnn, 5
    state, cells, inputs = None, [], [model.embed(idx)]
    with torch.no_grad():
        for t in range(9):
            out, state = lstm(inputs[0][:, t : t + 1], state)
            cells.append(state[1].clone())                            # (layers, B, H)
        inputs.append(lstm(inputs[0])[0] * 0)  # placeholder so the loop below reads layer inputs by index
        layer_in = [inputs[0], nn.LSTM(6, H, 1, batch_first=True)]
        layer_in[1].load_state_dict({k.replace("_l0", "_l0"): v for k, v in lstm.state_dict().items() if "_l0" in k})
        layer_in = [inputs[0], layer_in[1](inputs[0])[0]]             # the inputs of layers 0 and 1
        for k in range(2):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}")
            b = getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")
            h_prev = torch.zeros(3, H)
            c_prev = torch.zeros(3, H)
            h_seq = nn.LSTM(layer_in[k].shape[-1], H, 1, batch_first=True)
            h_seq.load_state_dict({n.replace(f"_l{k}", "_l0"): v for n, v in lstm.state_dict().items()
                                   if n.endswith(f"_l{k}")})
            hs = h_seq(layer_in[k])[0]                                 # (B, T, H)
            for t in range(9):
                pre = layer_in[k][:, t] @ w_ih.T + h_prev @ w_hh.T + b  # (B, 4H), gates i, f, g, o
                i, g = torch.sigmoid(pre[:, :H]), torch.tanh(pre[:, 2 * H : 3 * H])
                c = gates[k][:, t] * c_prev + i * g
                torch.testing.assert_close(c, cells[t][k], atol=1e-5, rtol=1e-4)
                h_prev, c_prev = hs[:, t], c


def test_forget_gate_bias_saturates_the_helper():
    from charlm.models.rnn import RNNLM

    model = RNNLM(len(VOCAB), cell="lstm", embed_dim=4, hidden_dim=3)
    idx = torch.randint(0, len(VOCAB), (2, 5))
    for bias, want in ((30.0, 1.0), (-30.0, 0.0)):
        with torch.no_grad():
            model.rnn.bias_ih_l0[3:6] = bias
        assert torch.allclose(lstm_forget_gates(model, idx)[0], torch.full((2, 5, 3), want), atol=1e-6)
    with pytest.raises(TypeError, match="nn.LSTM"):
        lstm_forget_gates(GPT(len(VOCAB), block_size=8, n_layer=1, n_head=1, n_embd=4), idx)


@pytest.mark.parametrize("keep", [0.9, 0.7])
def test_gradient_follows_a_constant_forget_gate(keep):
    """With no recurrent weights and f = keep everywhere, the lag-k gradient shrinks by about `keep` per
    character, and the measurement says so (slopes in log space, aligned lag for lag)."""
    from charlm.models.rnn import RNNLM

    torch.manual_seed(0)
    model = RNNLM(len(VOCAB), cell="lstm", embed_dim=8, hidden_dim=16, forget_bias=0)
    H = 16
    with torch.no_grad():
        model.rnn.weight_hh_l0.zero_()
        model.rnn.weight_ih_l0[H : 2 * H] = 0
        model.rnn.bias_hh_l0[H : 2 * H] = 0
        model.rnn.bias_ih_l0[H : 2 * H] = float(np.log(keep / (1 - keep)))
    x, y = torch.randint(0, len(VOCAB), (64, 30)), torch.randint(0, len(VOCAB), (64, 30))
    c = gradient_vs_forget(model, x, y, max_lag=20)
    assert c["forget_decay"] == pytest.approx(keep, abs=1e-4)
    assert c["grad_decay"] == pytest.approx(keep, abs=0.04), c["grad_decay"]
    assert c["r"] > 0.95 and len(c["grad"]) == 21 and c["grad"][1] == pytest.approx(1.0)


@pytest.mark.slow  # test_contract.py checks every model's gate openings; this adds two layers
def test_gate_hooks_return_openings_in_unit_interval():
    names = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    sizes = {"embed_dim": 8, "hidden_dim": 16, "n_embd": 16, "n_layer": 1, "n_head": 2, "num_layers": 2}
    idx = torch.randint(0, 11, (2, 12))
    for name in names:
        torch.manual_seed(0)
        model = instantiate(model_config(name, 16, sizes), vocab_size=11, _convert_="all")
        hook = capabilities(model).gate_openings
        if hook is None:
            continue
        gates = hook(idx)  # {} where a model has no memory gate (a vanilla RNN)
        for key, v in gates.items():
            assert v.dim() == 0 and 0 <= float(v) <= 1, (name, key, v)


# ---- the report ---------------------------------------------------------------------------


def fake_compare_folder(folder: Path) -> Path:
    """What charlm.compare leaves for the report: context.md (its heading first) and context.png."""
    folder.mkdir(parents=True)
    (folder / "context.md").write_text("## Context used on real text\n\n![context](context.png)\n\n"
                                       "- rnn: full context 1.6 nats, effective context 11 chars.\n")
    (folder / "context.png").write_bytes(b"\x89PNG fake figure bytes")
    return folder


def test_report_context_from_a_folder_without_curves_is_one_config_error(tmp_path):
    from charlm.errors import ConfigError
    from charlm.studies.report import context_section

    assert context_section(None, tmp_path) == []
    (tmp_path / "cmp").mkdir()
    with pytest.raises(ConfigError, match="context_from=.*cmp: no context.md"):
        context_section(str(tmp_path / "cmp"), tmp_path)
    assert not (tmp_path / "context.png").exists()


def test_report_tiny_end_to_end(tmp_path):
    out = tmp_path / "reports"
    compare = fake_compare_folder(tmp_path / "compare")
    run_cli("charlm.report", "size=tiny", f"out_dir={out}", f"context_from={compare}", env={"OMP_NUM_THREADS": "1"})
    assert (out / "context.png").read_bytes() == (compare / "context.png").read_bytes()
    md = (out / "REPORT.md").read_text()
    tail = md[md.index("## Context used on real text"):]  # after the spans, with the compare's lines
    assert md.index("## Context used on real text") > md.index("![memory span](memory_span.png)")
    assert f"From the `charlm.compare` run in `{compare}`" in tail and "effective context 11 chars" in tail
    for f in ("gradient_flow.png", "clipping.png", "memory_span.png", "gates.png", "REPORT.md"):
        assert (out / f).stat().st_size > 500, f
    span_json = json.loads((out / "memory_span.json").read_text())
    task = span_json["task"]
    assert task["lags"] == [0, 2, 8, 24] and task["thresholds"] == [0.9, 0.5] and task["seeds"] == [1337, 1338]
    wanted = ["rnn", "lstm", "gru", "transformer", "mingru", "minlstm", "hawk", "mamba", "slstm", "mlstm", "xlstm"]
    expected = [m for m in wanted if (CONF / "model" / f"{m}.yaml").exists()]
    assert list(span_json["models"]) == expected
    for name, m in span_json["models"].items():
        assert m["lags"] == [0, 2, 8, 24] and len(m["accuracy"]) == 4
        assert set(m["accuracy_by_seed"]) == {"1337", "1338"}
        for acc in m["accuracy_by_seed"].values():
            assert len(acc) == 4 and all(0 <= a <= 1 for a in acc)
        assert m["accuracy"] == pytest.approx([(a + b) / 2 for a, b in zip(*m["accuracy_by_seed"].values())])
        assert set(m["span"]) == {"0.9", "0.5"} and all(s is None or s in m["lags"] for s in m["span"].values())
        assert m["window"] == (16 if name == "transformer" else None)
    runs = span_json["tbptt"]["runs"]
    assert span_json["tbptt"]["model"] == "lstm" and list(runs) == ["8", "16"]
    assert [r["block_size"] for r in runs.values()] == [8, 16] and [r["batch_size"] for r in runs.values()] == [16, 8]
    gates = json.loads((out / "gates.json").read_text())
    assert list(gates) == expected
    for name, g in gates.items():
        assert len(g["curve"]) == (16 if name == "transformer" else 24)
        for h in g["history"]:
            assert all(0 <= v <= 1 for k, v in h.items() if k != "step")
    assert "forget_claim" in gates["lstm"]
    md = (out / "REPORT.md").read_text()
    assert "![memory span](memory_span.png)" in md and "![gates](gates.png)" in md
    for name in expected:
        assert re.search(rf"^\| {name} \| ", md, re.M), name
