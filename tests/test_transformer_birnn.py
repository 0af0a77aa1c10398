"""GPT (KV cache, sliding window) and BiRNNLM (two directions, infill) keep the one model interface."""

from __future__ import annotations

import pytest
import torch

from charlm.data.vocab import CharVocab
from charlm.errors import SampleArgError, UnknownCharError
from charlm.generate import generate
from charlm.models.birnn import BiRNNLM
from charlm.models.transformer import GPT

V = 7
BLOCK = 8
ATOL = {"atol": 1e-5, "rtol": 1e-5}


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("gpt"):
        opts = {"gpt": {}, "gpt_post": {"norm": "post"}, "gpt_sin": {"pos": "sinusoidal"}}[name]
        return GPT(V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, **opts).eval()
    return BiRNNLM(V, cell=name.split("_")[1], embed_dim=8, hidden_dim=16, num_layers=2).eval()


GPTS = ["gpt", "gpt_post", "gpt_sin"]  # chunking and causality: test_contract.py, for every model


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_birnn_backward_reads_only_the_future(cell):
    model = tiny(f"birnn_{cell}")
    idx = torch.randint(0, V, (2, 10))
    t = 5
    changed = idx.clone()
    changed[:, :t] = (changed[:, :t] + 1) % V
    a, b = model.backward_logits(idx), model.backward_logits(changed)
    assert a.shape == (2, 10, V)
    torch.testing.assert_close(a[:, t:], b[:, t:], **ATOL)
    assert not torch.allclose(a[:, :t], b[:, :t])


def test_birnn_aux_loss_is_backward_cross_entropy():
    model = tiny("birnn_lstm")
    # two windows of T+1 = 5 characters: idx is the first 4, targets the last 4
    idx = torch.tensor([VOCAB.encode("abcd"), VOCAB.encode("dd\na")])
    targets = torch.tensor([VOCAB.encode("bcde"), VOCAB.encode("d\nab")])
    loss = model.aux_losses(idx, targets)["bwd_loss"]
    # by hand: every character of idx, predicted from all that follows it in its window (and nothing else)
    pairs = [("bcde", "a"), ("cde", "b"), ("de", "c"), ("e", "d"),
             ("d\nab", "d"), ("\nab", "d"), ("ab", "\n"), ("b", "a")]
    terms = [
        torch.nn.functional.cross_entropy(
            model.backward_logits(torch.tensor([VOCAB.encode(after)]))[:, 0],  # what came before `after`
            torch.tensor(VOCAB.encode(char)),
        )
        for after, char in pairs
    ]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), **ATOL)
    loss.backward()  # trains the backward stack, not the forward one
    assert model.bwd.weight_hh_l0.grad.abs().sum() > 0
    assert model.rnn.weight_hh_l0.grad is None


@pytest.mark.parametrize("name", GPTS)
def test_kv_cache_matches_recomputation(name):
    model = tiny(name)
    idx = torch.randint(0, V, (2, BLOCK))
    logits, state = model(idx[:, :1])
    steps = [logits]
    for t in range(1, BLOCK):
        logits, state = model(idx[:, t : t + 1], state)
        steps.append(logits)
        full, _ = model(idx[:, : t + 1])  # no cache: recompute the whole prefix
        torch.testing.assert_close(logits[:, 0], full[:, -1], **ATOL)
    assert state["k"][0].shape == (2, 2, BLOCK, 8)  # (B, n_head, cached tokens, head dim)
    torch.testing.assert_close(torch.cat(steps, 1), model(idx)[0], **ATOL)


@pytest.mark.parametrize("name", GPTS)
def test_sliding_window_past_block_size(name):
    """Past block_size each step equals a fresh forward over the ids the state keeps (the window)."""
    model = tiny(name)
    idx = torch.randint(0, V, (2, 3 * BLOCK))
    state, steps = None, []
    for t in range(idx.size(1)):
        logits, state = model(idx[:, t : t + 1], state)
        steps.append(logits)
        kept = state["idx"]
        assert BLOCK // 2 < kept.size(1) <= BLOCK or t < BLOCK
        torch.testing.assert_close(kept, idx[:, t + 1 - kept.size(1) : t + 1])
        fresh, _ = model(kept)
        torch.testing.assert_close(logits[:, 0], fresh[:, -1], **ATOL)
    # rebuilds happen at the same token counts however the input is chunked
    whole, _ = model(idx)
    torch.testing.assert_close(torch.cat(steps, 1), whole, **ATOL)
    a, s = model(idx[:, :5])
    b, _ = model(idx[:, 5:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, **ATOL)


def test_gpt_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_head"):
        GPT(V, n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="norm"):
        GPT(V, norm="middle")


VOCAB = CharVocab("abcde \n")  # 7 chars


def test_infill_fills_masks():
    model = tiny("birnn_lstm")
    out = model.infill(VOCAB, "ab_de a_", mask="_")
    assert len(out) == len("ab_de a_")
    assert out[:2] == "ab" and out[3:7] == "de a"
    assert "_" not in out and all(c in VOCAB.stoi for c in out)
    assert model.infill(VOCAB, "__") != "__"  # no context on either side still fills


def test_infill_uses_the_right_context():
    """Trained on ' acd bce' in both orders, after ' ' the forward direction cannot tell 'a' from 'b': the
    characters after the gap decide."""
    torch.manual_seed(0)
    model = BiRNNLM(V, cell="lstm", embed_dim=8, hidden_dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    seq = torch.tensor([VOCAB.encode(" acd bce" * 3), VOCAB.encode(" bce acd" * 3)])
    for _ in range(30):
        logits, _ = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        loss = loss + model.aux_losses(seq[:, :-1], seq[:, 1:])["bwd_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.infill(VOCAB, " _cd") == " acd"
    assert model.infill(VOCAB, " _ce") == " bce"
    assert model.infill(VOCAB, "_ce") == "bce"  # backward direction alone
    assert model.infill(VOCAB, " a_") == " ac"  # forward direction alone
    assert model.infill(VOCAB, " _ce a_d") == " bce acd"  # two gaps, filled left to right


def test_infill_refuses_bad_text():
    model = tiny("birnn_lstm")
    with pytest.raises(SampleArgError, match="no '_'"):
        model.infill(VOCAB, "abc")
    with pytest.raises(UnknownCharError):
        model.infill(VOCAB, "ab_z")
    assert model.infill(VOCAB, "ab_z", unknown="skip").endswith("z")  # skipped as context, kept in the text


@pytest.mark.parametrize("name", ["gpt", "birnn_lstm"])
def test_generate(name):
    model = tiny(name)
    g = torch.Generator().manual_seed(0)
    texts = generate(model, VOCAB, "ab", 20, temperature=1.0, num_samples=2, generator=g)
    assert [len(t) for t in texts] == [20, 20]
    assert all(c in VOCAB.stoi for t in texts for c in t)
