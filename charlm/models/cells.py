"""Recurrent cells run step by step in Python, and `CellStack`, which runs any of them over a sequence.

Every cell has one shape: the layer projects the input of all timesteps at once
(`x_proj = cell.project(x)`, one matmul), then loops over time calling
`h_t, state = cell(x_proj[t], state)`, so only the recurrent part is sequential.

`LSTMCell` and `GRUCell` use PyTorch's parameter layout and names (weight_ih, weight_hh,
bias_ih, bias_hh; gates i,f,g,o and r,z,n), so weights copied from nn.LSTM / nn.GRU give the
same outputs. `TanhOutGRUCell` and `SingleGateGRUCell` are the gated variants that the notes
behind charlm propose; they keep one bias per gate (bias_ih) and no bias_hh.

A cell's state is a tensor h (B, H) or a tuple (h, c); a stack's state is a tuple of them, one
per layer: plain tensors, so `tree_map` can detach it and a checkpoint can hold it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Cell(nn.Module):
    """Common parts: weight_ih (G*H, in), weight_hh (G*H, H), bias_ih (G*H,), PyTorch's uniform init."""

    gates = 1
    has_cell_state = False  # True: state is (h, c); False: state is h
    has_bias_hh = False

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        G = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(G))
        self.bias_hh = nn.Parameter(torch.empty(G)) if self.has_bias_hh else None
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b for every timestep at once: (..., in) -> (..., G*H)."""
        return F.linear(x, self.weight_ih, self.bias_ih)

    def init_state(self, batch: int, like: torch.Tensor):
        h = like.new_zeros(batch, self.hidden_size)
        return (h, h.clone()) if self.has_cell_state else h


class LSTMCell(Cell):
    """PyTorch's LSTM, gates (i, f, g, o):

        i, f, o = sigmoid(W_* x + b_i* + U_* h_{t-1} + b_h*),  g = tanh(W_g x + b_ig + U_g h_{t-1} + b_hg)
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(c_t)                                      state (h, c)
    """

    gates, has_cell_state, has_bias_hh = 4, True, True

    def forward(self, x_proj: torch.Tensor, state):
        h, c = state
        i, f, g, o = (x_proj + F.linear(h, self.weight_hh, self.bias_hh)).chunk(4, -1)  # 4 x (B, H)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class GRUCell(Cell):
    """PyTorch's GRU, gates (r, z, n):

        r, z = sigmoid(W_* x + b_i* + U_* h_{t-1} + b_h*)
        n_t = tanh(W_n x + b_in + r * (U_n h_{t-1} + b_hn))
        h_t = (1 - z) * n_t + z * h_{t-1}                        state h
    """

    gates, has_bias_hh = 3, True

    def forward(self, x_proj: torch.Tensor, h):
        xr, xz, xn = x_proj.chunk(3, -1)                                       # 3 x (B, H)
        hr, hz, hn = F.linear(h, self.weight_hh, self.bias_hh).chunk(3, -1)  # 3 x (B, H)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = n + z * (h - n)
        return h, h


class TanhOutGRUCell(Cell):
    """GRU with its tanh moved to the output and an extra state vector c, like LSTM's cell;
    gates (r, z, c):

        r, z = sigmoid(W_* x + U_* h_{t-1} + b_*)
        c_t = (1 - z) * c_{t-1} + z * (W_c x + U_c (r * h_{t-1}) + b_c)
        h_t = tanh(c_t)                                          state (h, c)

    c_{t-1} reaches c_t through (1 - z) alone, with no squashing on the way (LSTM's
    constant-error path), while there are only GRU's two gates.
    """

    gates, has_cell_state = 3, True

    def forward(self, x_proj: torch.Tensor, state):
        h, c = state
        H = self.hidden_size
        xr, xz, xc = x_proj.chunk(3, -1)                                # 3 x (B, H)
        hr, hz = F.linear(h, self.weight_hh[: 2 * H]).chunk(2, -1)    # 2 x (B, H)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        cand = xc + F.linear(r * h, self.weight_hh[2 * H :])            # (B, H)
        c = c + z * (cand - c)
        h = torch.tanh(c)
        return h, (h, c)


class SingleGateGRUCell(Cell):
    """GRU whose reset and update gates are one gate g; gates (g, n):

        g_t = sigmoid(W_g x + U_g h_{t-1} + b_g)
        n_t = tanh(W_n x + U_n (g_t * h_{t-1}) + b_n)
        h_t = (1 - g_t) * h_{t-1} + g_t * n_t                    state h
    """

    gates = 2

    def forward(self, x_proj: torch.Tensor, h):
        H = self.hidden_size
        xg, xn = x_proj.chunk(2, -1)                                     # 2 x (B, H)
        g = torch.sigmoid(xg + F.linear(h, self.weight_hh[:H]))         # (B, H)
        n = torch.tanh(xn + F.linear(g * h, self.weight_hh[H:]))        # (B, H)
        h = h + g * (n - h)
        return h, h


PY_CELLS: dict[str, type[Cell]] = {
    "lstm": LSTMCell,
    "gru": GRUCell,
    "gru_tanh_out": TanhOutGRUCell,
    "gru_single_gate": SingleGateGRUCell,
}


class CellStack(nn.Module):
    """`num_layers` cells over (B, T, E) -> (B, T, H), dropout between layers (as nn.LSTM does).

    State: a tuple with one cell state per layer (h or (h, c), each (B, H)); None starts at zeros.
    """

    def __init__(
        self, cell: str | type[Cell], input_size: int, hidden_size: int, num_layers: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if isinstance(cell, str):
            if cell not in PY_CELLS:
                raise ValueError(f"cell={cell!r}: must be one of {sorted(PY_CELLS)}")
            cell = PY_CELLS[cell]
        self.layers = nn.ModuleList(
            cell(input_size if k == 0 else hidden_size, hidden_size) for k in range(num_layers)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state=None):
        B = x.shape[0]
        if state is None:
            state = tuple(layer.init_state(B, x) for layer in self.layers)
        new_state = []
        for k, (layer, s) in enumerate(zip(self.layers, state)):
            if k > 0:
                x = self.drop(x)
            x_proj = layer.project(x.transpose(0, 1))  # (T, B, G*H): one matmul for all steps
            out = []
            for x_t in x_proj:                          # (B, G*H)
                h, s = layer(x_t, s)                    # (B, H)
                out.append(h)
            x = torch.stack(out, 1)                     # (B, T, H)
            new_state.append(s)
        return x, tuple(new_state)
