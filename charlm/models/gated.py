"""GatedRNNLM: RNNLM's shape on the step-by-step cells of `cells.py`, for the gated GRU variants.

`gru_tanh_out` and `gru_single_gate` exist only here; `lstm` and `gru` are here too so the
Python cells can be checked against cuDNN (`load_from_cudnn`) and timed against it.
"""

from __future__ import annotations

import torch
from torch import nn

from charlm.models.cells import CELLS, CellStack
from charlm.models.rnn import RNNLM


class GatedRNNLM(nn.Module):
    """Embedding -> CellStack -> dropout -> linear head. State: one h or (h, c) per layer."""

    gpu_precision = "32-true"  # custom cells: fp32 by default (16-mixed works too)
    preferred_sampling = "stream"  # data.sampling=auto: truncated BPTT, like RNNLM

    def __init__(
        self,
        vocab_size: int,
        cell: str = "gru_tanh_out",
        embed_dim: int = 64,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        forget_bias: float = 1.0,
        tie_weights: bool = False,
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"model.cell={cell!r}: must be one of {sorted(CELLS)}")
        if tie_weights and embed_dim != hidden_dim:
            raise ValueError(f"model.tie_weights needs embed_dim == hidden_dim (got {embed_dim} and {hidden_dim})")
        self.cell = cell
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = CellStack(cell, embed_dim, hidden_dim, num_layers, dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight
        if cell == "lstm" and forget_bias:
            # as RNNLM: forget slice (i, f, g, o) of bias_ih = value, of bias_hh = 0
            for layer in self.rnn.layers:
                with torch.no_grad():
                    layer.bias_ih[hidden_dim : 2 * hidden_dim] = forget_bias
                    layer.bias_hh[hidden_dim : 2 * hidden_dim] = 0.0

    def forward(self, idx: torch.Tensor, state=None):
        x = self.embed(idx)                # (B, T, E)
        out, state = self.rnn(x, state)    # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, state


@torch.no_grad()
def load_from_cudnn(model: GatedRNNLM, rnnlm: RNNLM) -> GatedRNNLM:
    """Copy an RNNLM's weights (same cell, lstm or gru, and sizes) into `model`; returns `model`."""
    if model.cell != rnnlm.cell or model.cell not in ("lstm", "gru"):
        raise ValueError(f"load_from_cudnn: cells differ or have no cuDNN twin ({model.cell} vs {rnnlm.cell})")
    model.embed.weight.copy_(rnnlm.embed.weight)
    model.head.load_state_dict(rnnlm.head.state_dict())
    for k, layer in enumerate(model.rnn.layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, name).copy_(getattr(rnnlm.rnn, f"{name}_l{k}"))
    return model
