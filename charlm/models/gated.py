"""GatedRNNLM: RNNLM's shape on the step-by-step cells of `cells.py`, for the gated GRU variants.

`gru_tanh_out` and `gru_single_gate` exist only here; `lstm` and `gru` are here too so the
Python cells can be checked against cuDNN (`load_from_cudnn`) and timed against it.
"""

from __future__ import annotations

from typing import Literal

import torch

from charlm.models.cells import PY_CELLS, CellStack
from charlm.models.rnn import RNNLM, RecurrentLM


class GatedRNNLM(RecurrentLM):
    """The recurrent shell on the Python cells of cells.py. State: one h or (h, c) per layer."""

    gpu_precision = "32-true"  # custom cells: fp32 by default (16-mixed works too)

    def __init__(
        self,
        vocab_size: int,
        cell: Literal["lstm", "gru", "gru_tanh_out", "gru_single_gate"] = "gru_tanh_out",
        embed_dim: int = 64,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        forget_bias: float = 1.0,
        tie_weights: bool = False,
    ):
        if cell not in PY_CELLS:
            raise ValueError(f"model.cell={cell!r}: must be one of {sorted(PY_CELLS)}")
        def stack():
            return CellStack(cell, embed_dim, hidden_dim, num_layers, dropout if num_layers > 1 else 0.0)

        super().__init__(vocab_size, cell, stack, embed_dim, hidden_dim, dropout, forget_bias, tie_weights)


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
