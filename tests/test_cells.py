"""The Python cells: parity with cuDNN for lstm/gru, and the one model interface for the gated variants."""

import pytest
import torch

from charlm.models.cells import CellStack
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


# ---- one hand-set step of each gated variant against its docstring equations ---------------------------------
# Weights are set by hand (input 2, hidden 2); the expected values are computed from the equations with plain
# torch ops, gate by gate, never through the cell. Two steps through `CellStack` from a non-zero state, so the
# carried state (h, c) is checked as well as the projection of the input.

X = torch.tensor([[[1.0, -2.0], [0.5, 1.5]]])  # (B=1, T=2, in=2)
T_ = torch.tensor
W = {  # per gate: W (H, in), U (H, H), b (H,)
    "a": (T_([[0.5, -0.25], [1.0, 0.75]]), T_([[0.25, -0.5], [0.5, 1.0]]), T_([0.1, -0.2])),
    "b": (T_([[-0.75, 0.5], [0.25, -1.0]]), T_([[-1.0, 0.25], [0.75, 0.5]]), T_([-0.3, 0.4])),
    "c": (T_([[1.5, 0.5], [-0.5, 0.25]]), T_([[0.5, 1.25], [-0.75, 0.5]]), T_([0.2, 0.05])),
}
H0, C0 = torch.tensor([[0.6, -0.4]]), torch.tensor([[-1.2, 0.9]])


def _set_gates(layer, names):
    """The cell's stacked layout: gate blocks in the docstring's order, no bias_hh."""
    with torch.no_grad():
        layer.weight_ih.copy_(torch.cat([W[n][0] for n in names]))
        layer.weight_hh.copy_(torch.cat([W[n][1] for n in names]))
        layer.bias_ih.copy_(torch.cat([W[n][2] for n in names]))
    assert layer.bias_hh is None


def _lin(gate, x, h):
    w, u, b = W[gate]
    return x @ w.T + h @ u.T + b


def test_gru_tanh_out_one_step_by_hand():
    stack = CellStack("gru_tanh_out", 2, 2)
    _set_gates(stack.layers[0], "abc")  # gates (r, z, c)
    h, c, want = H0, C0, []
    for t in range(2):
        x = X[:, t]
        r = torch.sigmoid(_lin("a", x, h))                      # r = sigmoid(W_r x + U_r h_{t-1} + b_r)
        z = torch.sigmoid(_lin("b", x, h))                      # z = sigmoid(W_z x + U_z h_{t-1} + b_z)
        w_c, u_c, b_c = W["c"]
        c = (1 - z) * c + z * (x @ w_c.T + (r * h) @ u_c.T + b_c)  # c_t = (1-z) c_{t-1} + z (W_c x + U_c (r h) + b_c)
        h = torch.tanh(c)                                       # h_t = tanh(c_t)
        want.append(h)
    out, state = stack(X, ((H0, C0),))
    torch.testing.assert_close(out, torch.stack(want, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(state[0][0], h, atol=1e-6, rtol=0)
    torch.testing.assert_close(state[0][1], c, atol=1e-6, rtol=0)
    assert not torch.allclose(c, h)  # c is carried un-squashed, not as h


def test_gru_single_gate_one_step_by_hand():
    stack = CellStack("gru_single_gate", 2, 2)
    _set_gates(stack.layers[0], "ab")  # gates (g, n)
    h, want = H0, []
    for t in range(2):
        x = X[:, t]
        g = torch.sigmoid(_lin("a", x, h))                      # g_t = sigmoid(W_g x + U_g h_{t-1} + b_g)
        w_n, u_n, b_n = W["b"]
        n = torch.tanh(x @ w_n.T + (g * h) @ u_n.T + b_n)       # n_t = tanh(W_n x + U_n (g_t h_{t-1}) + b_n)
        h = (1 - g) * h + g * n                                 # h_t = (1 - g_t) h_{t-1} + g_t n_t
        want.append(h)
    out, state = stack(X, (H0,))
    torch.testing.assert_close(out, torch.stack(want, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(state[0], h, atol=1e-6, rtol=0)
