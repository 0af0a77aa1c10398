"""The model contract, for every model in conf/model/: a model joins these tests by having a YAML."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, TINY_SIZES

from charlm.data.vocab import CharVocab
from charlm.generate import generate
from charlm.models.contract import build_model, capabilities
from charlm.studies.gradflow import model_config

MODEL_NAMES = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
V = 9
ATOL = {"atol": 1e-5, "rtol": 1e-5}


# Options of a conf/model/NAME.yaml whose code paths the defaults do not take: "NAME:key=value,...".
VARIANTS = ["transformer:norm=post", "transformer:pos=sinusoidal", "birnn:cell=gru,num_layers=2", "xlstm:pattern=ms"]


def tiny(name: str, seq_len: int = 12) -> torch.nn.Module:
    """conf/model/NAME.yaml at TINY_SIZES, or a VARIANTS entry: NAME with its listed keys replaced."""
    name, _, opts = name.partition(":")
    sizes = dict(TINY_SIZES)
    for kv in filter(None, opts.split(",")):
        key, value = kv.split("=")
        sizes[key] = int(value) if value.isdigit() else value
    torch.manual_seed(0)
    return build_model(model_config(name, seq_len, sizes), V).eval()


@pytest.mark.parametrize("name", MODEL_NAMES + VARIANTS)
def test_chunked_equals_whole(name):
    model = tiny(name)
    idx = torch.randint(0, V, (2, 11))
    whole, _ = model(idx)
    a, s = model(idx[:, :1])
    b, s = model(idx[:, 1:4], s)
    c, _ = model(idx[:, 4:], s)
    torch.testing.assert_close(torch.cat([a, b, c], 1), whole, **ATOL)


@pytest.mark.parametrize("name", MODEL_NAMES + VARIANTS)
def test_later_characters_never_change_earlier_logits(name):
    model = tiny(name)
    idx = torch.randint(0, V, (2, 10))
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % V
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :6], b[:, :6], **ATOL)
    assert not torch.allclose(a[:, 6:], b[:, 6:])  # and the changed characters are read


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_greedy_stepwise_generation_equals_the_parallel_forward(name):
    """generate() steps the state one character at a time; each greedy pick must be the argmax of a
    parallel forward over everything so far."""
    model = tiny(name)
    vocab = CharVocab("abcdefgh\n")
    text = generate(model, vocab, "abc", 8, temperature=0)[0]
    ids = torch.tensor([vocab.encode("abc" + text)])
    logits, _ = model(ids)
    expected = logits[0, 2:-1].argmax(-1)
    assert vocab.decode(expected.tolist()) == text


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gate_openings_in_unit_interval(name):
    model = tiny(name)
    hook = capabilities(model).gate_openings
    if hook is None:
        pytest.skip(f"{name} declares no gate openings")
    model.train()
    gates = hook(torch.randint(0, V, (3, 10)))
    if name in ("rnn", "stacked_rnn"):
        assert gates == {}  # a vanilla RNN has no gate: the hook says so
        return
    assert gates and all(0.0 <= float(v) <= 1.0 for v in gates.values()), gates
    assert all(k.startswith("layer") for k in gates)
    assert model.training  # mode restored


def test_capabilities_defaults_and_declarations():
    lstm, gpt = tiny("lstm"), tiny("transformer")
    assert capabilities(lstm).context_size is None and capabilities(lstm).evaluation == "streams"
    assert capabilities(gpt).context_size == 12 and capabilities(gpt).evaluation == "window"
    assert capabilities(lstm).preferred_sampling == "stream" and capabilities(gpt).preferred_sampling == "random"
    assert capabilities(tiny("birnn")).aux_losses is not None and capabilities(lstm).aux_losses is None
    plain = torch.nn.Sequential(torch.nn.Embedding(3, 4))
    caps = capabilities(plain)  # a model that declares nothing gets every default
    assert caps.preferred_sampling == "stream" and caps.gpu_precision == "32-true" and caps.gate_openings is None
    assert caps.token_embedding is plain[0]
