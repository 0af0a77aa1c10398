"""The Python cells: parity with cuDNN for lstm/gru, and the one model interface for the gated variants."""

import pytest
import torch

from charlm.models.gated import GatedRNNLM, load_from_cudnn
from charlm.models.rnn import RNNLM

V, E, H = 5, 6, 8
VARIANTS = ["gru_tanh_out", "gru_single_gate"]


def tiny(cell: str, **kw) -> GatedRNNLM:
    torch.manual_seed(0)
    return GatedRNNLM(V, cell=cell, embed_dim=E, hidden_dim=H, **kw)


def as_cudnn_state(state, cell: str):
    """Per-layer tuple -> nn.LSTM's (h, c) or nn.GRU's h, each (L, B, H)."""
    if cell == "lstm":
        return torch.stack([h for h, _ in state]), torch.stack([c for _, c in state])
    return torch.stack(state)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_matches_cudnn(cell):
    torch.manual_seed(0)
    ref = RNNLM(V, cell=cell, embed_dim=E, hidden_dim=H, num_layers=2).eval()
    model = load_from_cudnn(tiny(cell, num_layers=2), ref).eval()
    idx = torch.randint(0, V, (3, 11))
    want, want_state = ref(idx)
    got, got_state = model(idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(as_cudnn_state(got_state, cell), want_state, atol=1e-5, rtol=0)
    # and continuing from the state: a second chunk still matches
    nxt = torch.randint(0, V, (3, 4))
    torch.testing.assert_close(model(nxt, got_state)[0], ref(nxt, want_state)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", VARIANTS)
def test_chunked_equals_whole(cell):
    model = tiny(cell, num_layers=2).eval()
    idx = torch.randint(0, V, (2, 9))
    whole, _ = model(idx)
    a, s = model(idx[:, :4])
    b, _ = model(idx[:, 4:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), whole)


@pytest.mark.parametrize("cell", VARIANTS)
def test_causal(cell):
    model = tiny(cell, num_layers=2).eval()
    idx = torch.randint(0, V, (2, 9))
    other = idx.clone()
    other[:, 5:] = (idx[:, 5:] + 1) % V
    a, _ = model(idx)
    b, _ = model(other)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=0, rtol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("cell", VARIANTS)
def test_gradients_flow(cell):
    model = tiny(cell, num_layers=2)
    idx = torch.randint(0, V, (2, 9))
    logits, _ = model(idx)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cell", VARIANTS)
def test_learns_repetition(cell):
    model = tiny(cell)
    seq = torch.tensor([[0, 1, 2, 3, 4] * 4])  # (1, 20)
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=0.03)

    def loss():
        return torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())

    first = loss().item()
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    last = loss().item()
    assert last < 0.3 * first, (first, last)
