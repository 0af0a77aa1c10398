"""The recurrent shell, written once, and RNNLM: vanilla RNN, LSTM and GRU on cuDNN kernels.

`RecurrentLM` is embedding -> recurrent stack -> dropout -> linear head (optionally tied), with the
LSTM forget-gate bias and the gate-openings hook of the model contract. RNNLM fills it with
nn.RNN / nn.LSTM / nn.GRU (`TORCH_RNNS`); GatedRNNLM (gated.py) with the Python cells of
cells.py (`PY_CELLS`); BiRNNLM (birnn.py) adds a second, backward stack.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.units import Hold, fixer

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


def _cell_step(cell: str, w: tuple, xp_t: torch.Tensor, h: torch.Tensor, c: torch.Tensor, relu: bool = False,
               fix_c: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """One step of `cell` from the layer's projected input xp_t (B, G*H) and its h, c (B, H), recomputed
    from the weights w = (weight_ih, weight_hh, bias_ih, bias_hh) in PyTorch's gate layout: (h, c, keep),
    keep the memory gate's opening (B, H), None for rnn. `fix_c` (held units) applies to c before h reads it."""
    w_ih, w_hh, b_ih, b_hh = w
    H = w_hh.shape[1]
    if cell == "lstm":
        i, f, g, o = (xp_t + F.linear(h, w_hh, b_hh)).chunk(4, -1)          # 4 x (B, H)
        f = torch.sigmoid(f)
        c = f * c + torch.sigmoid(i) * torch.tanh(g)
        c = fix_c(c) if fix_c else c
        return torch.sigmoid(o) * torch.tanh(c), c, f
    if cell == "gru":
        xr, xz, xn = xp_t.chunk(3, -1)
        hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, -1)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + torch.sigmoid(xr + hr) * hn)
        return n + z * (h - n), c, z
    if cell == "gru_tanh_out":
        xr, xz, xc = xp_t.chunk(3, -1)
        hr, hz = F.linear(h, w_hh[: 2 * H]).chunk(2, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        c = c + z * (xc + F.linear(r * h, w_hh[2 * H :]) - c)
        c = fix_c(c) if fix_c else c
        return torch.tanh(c), c, 1 - z
    if cell == "gru_single_gate":
        xg, xn = xp_t.chunk(2, -1)
        g = torch.sigmoid(xg + F.linear(h, w_hh[:H]))
        return h + g * (torch.tanh(xn + F.linear(g * h, w_hh[H:])) - h), c, 1 - g
    pre = xp_t + F.linear(h, w_hh, b_hh)                                     # rnn: (B, H)
    return (torch.relu(pre) if relu else torch.tanh(pre)), c, None


@torch.no_grad()
def retain_trace(cell: str, stack: nn.Module, x: torch.Tensor, state=None) -> dict[str, torch.Tensor]:
    """Opening of each layer's memory gate at every position of x (B, T, E), averaged over units and
    recomputed step by step from the weights, starting from the stack's `state`: how much of the
    previous memory a step keeps. lstm: forget gate f; gru: update gate z (h = (1-z) n + z h_prev);
    gru_tanh_out: 1 - z (on c); gru_single_gate: 1 - g. Values (B, T); {} for rnn."""
    if cell == "rnn":
        return {}
    out = {}
    for k, (w, (h0, c0)) in enumerate(zip(layer_weights(stack), _layer_states(cell, stack, state))):
        h = x.new_zeros(x.shape[0], w[1].shape[1]) if h0 is None else h0
        c = h.clone() if c0 is None else c0
        xp = F.linear(x, w[0], w[2])                                          # (B, T, G*H)
        keep, hs = [], []
        for t in range(x.shape[1]):
            h, c, opening = _cell_step(cell, w, xp[:, t], h, c)
            keep.append(opening.mean(-1))
            hs.append(h)
        x = torch.stack(hs, 1)                                                # (B, T, H): next layer's input
        out[f"layer{k}/{'forget' if cell == 'lstm' else 'retain'}"] = torch.stack(keep, 1)  # (B, T)
    return out


CELL_STATE = ("lstm", "gru_tanh_out")  # the cells with a cell state c besides h


def unit_steps(cell: str, stack: nn.Module, x: torch.Tensor, state=None, hold: Hold | None = None):
    """The stack over x (B, T, E) step by step from the weights, from `state`, with the units of `hold`
    ({"layer{i}/h" or "layer{i}/c": {unit: value}}) fixed as they are computed. Returns (the last layer's
    h (B, T, H), {"layer{i}/h": (B, T, H), and "layer{i}/c" for the cells with one}, the state in the
    stack's own form). Runs as in eval mode: no dropout between layers."""
    hold = hold or {}
    relu = getattr(stack, "nonlinearity", "tanh") == "relu"
    acts, last = {}, []
    for k, (w, (h0, c0)) in enumerate(zip(layer_weights(stack), _layer_states(cell, stack, state))):
        h = x.new_zeros(x.shape[0], w[1].shape[1]) if h0 is None else h0
        c = h.clone() if c0 is None else c0
        fix_h, fix_c = (fixer(hold[n], h) if n in hold else None for n in (f"layer{k}/h", f"layer{k}/c"))
        xp = F.linear(x, w[0], w[2])                                          # (B, T, G*H)
        hs, cs = [], []
        for t in range(x.shape[1]):
            h, c, _ = _cell_step(cell, w, xp[:, t], h, c, relu, fix_c)
            h = fix_h(h) if fix_h else h
            hs.append(h)
            cs.append(c)
        x = torch.stack(hs, 1)                                                # (B, T, H): next layer's input
        acts[f"layer{k}/h"] = x
        if cell in CELL_STATE:
            acts[f"layer{k}/c"] = torch.stack(cs, 1)                          # (B, T, H)
        last.append((h, c))
    if hasattr(stack, "layers"):  # CellStack: one h or (h, c) per layer
        state = tuple((h, c) if cell in CELL_STATE else h for h, c in last)
    else:  # cuDNN: h or (h, c), each (L, B, H)
        h, c = (torch.stack(s) for s in zip(*last))
        state = (h, c) if cell == "lstm" else h
    return x, acts, state


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

    _hold: Hold | None = None  # set inside hold_units: forward then steps through the stack, those units fixed

    def forward(self, idx: torch.Tensor, state=None):
        x = self.embed(idx)                # (B, T, E)
        if self._hold is None:
            out, state = self.rnn(x, state)    # (B, T, H)
        else:                              # held units: step by step from the weights
            out, _, state = unit_steps(self.cell, self.rnn, x, state, self._hold)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, state

    def gate_openings(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The contract's hook: mean memory-gate opening per layer on idx (see `retain_gates`)."""
        return retain_gates(self.cell, self.rnn, self.embed(idx))

    @torch.no_grad()
    def gate_trace(self, idx: torch.Tensor, state=None):
        """The contract's per-position hook: ({layer: (B, T) mean opening}, the state forward carries)."""
        return retain_trace(self.cell, self.rnn, self.embed(idx), state), self(idx, state)[1]

    @torch.no_grad()
    def unit_trace(self, idx: torch.Tensor, state=None):
        """The contract's unit hook: ({"layer{i}/h": (B, T, H), and "layer{i}/c" for the LSTM and gru_tanh_out},
        the state forward carries), step by step from the weights (`unit_steps`), held units fixed."""
        _, acts, state = unit_steps(self.cell, self.rnn, self.embed(idx), state, self._hold)
        return acts, state

    @contextlib.contextmanager
    def hold_units(self, hold: Hold) -> Iterator[None]:
        """The contract's held units: inside, forward and unit_trace keep hold's units at their values."""
        kinds = ("h", "c") if self.cell in CELL_STATE else ("h",)
        names = {f"layer{k}/{kind}" for k in range(len(layer_weights(self.rnn))) for kind in kinds}
        if set(hold) - names:
            raise KeyError(f"no layer {sorted(set(hold) - names)}; the model has {sorted(names)}")
        self._hold = dict(hold)
        try:
            yield
        finally:
            self._hold = None


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
