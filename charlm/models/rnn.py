"""The recurrent shell, written once, and RNNLM: vanilla RNN, LSTM and GRU on cuDNN kernels.

`RecurrentLM` is embedding -> recurrent stack -> dropout -> linear head (optionally tied), with the
LSTM forget-gate bias and the gate-openings hook of the model contract. RNNLM fills it with
nn.RNN / nn.LSTM / nn.GRU (`TORCH_RNNS`); GatedRNNLM (gated.py) with the Python cells of
cells.py (`PY_CELLS`); BiRNNLM (birnn.py) adds a second, backward stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

TORCH_RNNS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def torch_stack(cell: str, embed_dim: int, hidden_dim: int, num_layers: int, dropout: float,
                **kwargs) -> Callable[[], nn.Module]:
    """A maker of `cell`'s cuDNN stack (batch first, dropout between layers only), for RecurrentLM.

    Raises ValueError naming model.cell for a cell that is not in TORCH_RNNS."""
    if cell not in TORCH_RNNS:
        raise ValueError(f"model.cell={cell!r}: must be one of {sorted(TORCH_RNNS)}")

    def make() -> nn.Module:
        return TORCH_RNNS[cell](embed_dim, hidden_dim, num_layers, batch_first=True,
                                dropout=dropout if num_layers > 1 else 0.0, **kwargs)

    return make


def layer_weights(stack: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """(weight_ih, weight_hh, bias_ih, bias_hh) per layer, for a cuDNN stack or a CellStack
    (bias_hh is None where a cell has none). Both use PyTorch's gate layout."""
    if hasattr(stack, "layers"):  # CellStack
        return [(c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh) for c in stack.layers]
    return [tuple(getattr(stack, f"{n}_l{k}", None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for k in range(stack.num_layers)]


def _layer_states(cell: str, stack: nn.Module, state) -> list:
    """(h, c) per layer, each (B, H) or None, from a stack's state (cuDNN: h or (h, c), each (L, B, H);
    CellStack: one h or (h, c) per layer)."""
    n = len(layer_weights(stack))
    if state is None:
        return [(None, None)] * n
    if hasattr(stack, "layers"):
        return [s if isinstance(s, tuple) else (s, None) for s in state]
    h, c = state if cell == "lstm" else (state, None)
    return [(h[k], None if c is None else c[k]) for k in range(n)]


@torch.no_grad()
def retain_trace(cell: str, stack: nn.Module, x: torch.Tensor, state=None) -> dict[str, torch.Tensor]:
    """Opening of each layer's memory gate at every position of x (B, T, E), averaged over units and
    recomputed step by step from the weights, starting from the stack's `state`: how much of the
    previous memory a step keeps. lstm: forget gate f; gru: update gate z (h = (1-z) n + z h_prev);
    gru_tanh_out: 1 - z (on c); gru_single_gate: 1 - g. Values (B, T); {} for rnn."""
    if cell == "rnn":
        return {}
    out = {}
    for k, ((w_ih, w_hh, b_ih, b_hh), (h0, c0)) in enumerate(zip(layer_weights(stack),
                                                                  _layer_states(cell, stack, state))):
        H = w_hh.shape[1]
        h = x.new_zeros(x.shape[0], H) if h0 is None else h0
        c = h.clone() if c0 is None else c0
        xp = F.linear(x, w_ih, b_ih)                                          # (B, T, G*H)
        keep, hs = [], []
        for t in range(x.shape[1]):
            if cell == "lstm":
                i, f, g, o = (xp[:, t] + F.linear(h, w_hh, b_hh)).chunk(4, -1)
                f = torch.sigmoid(f)
                c = f * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                keep.append(f.mean(-1))
            elif cell == "gru":
                xr, xz, xn = xp[:, t].chunk(3, -1)
                hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, -1)
                z = torch.sigmoid(xz + hz)
                n = torch.tanh(xn + torch.sigmoid(xr + hr) * hn)
                h = n + z * (h - n)
                keep.append(z.mean(-1))
            elif cell == "gru_tanh_out":
                xr, xz, xc = xp[:, t].chunk(3, -1)
                hr, hz = F.linear(h, w_hh[: 2 * H]).chunk(2, -1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                c = c + z * (xc + F.linear(r * h, w_hh[2 * H :]) - c)
                h = torch.tanh(c)
                keep.append((1 - z).mean(-1))
            else:  # gru_single_gate
                xg, xn = xp[:, t].chunk(2, -1)
                g = torch.sigmoid(xg + F.linear(h, w_hh[:H]))
                h = h + g * (torch.tanh(xn + F.linear(g * h, w_hh[H:])) - h)
                keep.append((1 - g).mean(-1))
            hs.append(h)
        x = torch.stack(hs, 1)                                                # (B, T, H): next layer's input
        out[f"layer{k}/{'forget' if cell == 'lstm' else 'retain'}"] = torch.stack(keep, 1)  # (B, T)
    return out


def retain_gates(cell: str, stack: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean opening of each layer's memory gate over x (B, T, E), from an empty state (`retain_trace`)."""
    return {k: v.mean() for k, v in retain_trace(cell, stack, x).items()}


def init_forget_bias(stack: nn.Module, value: float) -> None:
    """Start the LSTM forget gate open, so early gradients survive many steps (Jozefowicz et al. 2015).

    PyTorch packs the gates as (input, forget, cell, output) and adds two biases; the forget slice
    of b_ih is set to `value` and that of b_hh to 0, so their sum is `value`."""
    for _, w_hh, b_ih, b_hh in layer_weights(stack):
        H = w_hh.shape[1]
        with torch.no_grad():
            b_ih[H : 2 * H] = value
            if b_hh is not None:
                b_hh[H : 2 * H] = 0.0


class RecurrentLM(nn.Module):
    """Embedding -> recurrent stack -> dropout -> linear head. State: the stack's (h, or (h, c))."""

    gpu_precision = "32-true"  # cuDNN runs RNNs under bf16 autocast in fp16, unscaled: use fp32 or 16-mixed
    preferred_sampling = "stream"  # data.sampling=auto: truncated BPTT, the state carries context past the window

    def __init__(self, vocab_size: int, cell: str, make_stack: Callable[[], nn.Module], embed_dim: int,
                 hidden_dim: int, dropout: float, forget_bias: float, tie_weights: bool):
        super().__init__()
        if tie_weights and embed_dim != hidden_dim:
            raise ValueError(f"model.tie_weights needs embed_dim == hidden_dim (got {embed_dim} and {hidden_dim})")
        self.cell = cell
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = make_stack()  # made after the embedding: the same initialisation as ever for a given seed
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight
        if cell == "lstm" and forget_bias:
            init_forget_bias(self.rnn, forget_bias)

    def forward(self, idx: torch.Tensor, state=None):
        x = self.embed(idx)                # (B, T, E)
        out, state = self.rnn(x, state)    # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, state

    def gate_openings(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The contract's hook: mean memory-gate opening per layer on idx (see `retain_gates`)."""
        return retain_gates(self.cell, self.rnn, self.embed(idx))

    @torch.no_grad()
    def gate_trace(self, idx: torch.Tensor, state=None):
        """The contract's per-position hook: ({layer: (B, T) mean opening}, the state forward carries)."""
        return retain_trace(self.cell, self.rnn, self.embed(idx), state), self(idx, state)[1]


class RNNLM(RecurrentLM):
    """The shell on cuDNN kernels: nn.RNN (tanh or relu), nn.LSTM or nn.GRU."""

    def __init__(
        self,
        vocab_size: int,
        cell: Literal["rnn", "lstm", "gru"] = "lstm",
        embed_dim: int = 64,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        nonlinearity: Literal["tanh", "relu"] = "tanh",
        forget_bias: float = 1.0,
        tie_weights: bool = False,
    ):
        kwargs = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
        stack = torch_stack(cell, embed_dim, hidden_dim, num_layers, dropout, **kwargs)
        super().__init__(vocab_size, cell, stack, embed_dim, hidden_dim, dropout, forget_bias, tie_weights)
