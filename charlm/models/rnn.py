"""RNNLM: vanilla RNN, LSTM and GRU language models on cuDNN kernels (nn.RNN / nn.LSTM / nn.GRU)."""

from __future__ import annotations

import torch
from torch import nn

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RNNLM(nn.Module):
    """Embedding -> recurrent stack -> dropout -> linear head. State: h (rnn, gru) or (h, c) (lstm)."""

    gpu_precision = "32-true"  # cuDNN runs RNNs under bf16 autocast in fp16, unscaled: use fp32 or 16-mixed
    preferred_sampling = "stream"  # data.sampling=auto: truncated BPTT, the state carries context past the window

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        embed_dim: int = 64,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        nonlinearity: str = "tanh",
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
        kwargs = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
        self.rnn = CELLS[cell](
            embed_dim, hidden_dim, num_layers, batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0, **kwargs,
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight
        if cell == "lstm" and forget_bias:
            self._init_forget_bias(forget_bias)

    def _init_forget_bias(self, value: float) -> None:
        """Start the forget gate open, so early gradients survive many steps (Jozefowicz et al. 2015).

        PyTorch packs the LSTM gates as (input, forget, cell, output) and adds two biases; the
        forget slice of b_ih is set to `value` and that of b_hh to 0, so their sum is `value`.
        """
        H = self.rnn.hidden_size
        for name, p in self.rnn.named_parameters():
            if name.startswith("bias_"):
                with torch.no_grad():
                    p[H : 2 * H] = value if name.startswith("bias_ih") else 0.0

    def forward(self, idx: torch.Tensor, state=None):
        x = self.embed(idx)                # (B, T, E)
        out, state = self.rnn(x, state)    # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, state
