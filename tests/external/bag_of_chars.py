"""A model written outside charlm (the README's "Adding a model" example): a decaying bag of characters.

h_t = decay * h_{t-1} + (1 - decay) * embed(x_t); logits_t = head(h_t). Its state is h.
"""

from __future__ import annotations

import torch
from torch import nn


class BagOfChars(nn.Module):
    preferred_sampling = "stream"  # optional: carry h across training batches (the default anyway)

    def __init__(self, vocab_size: int, hidden_dim: int = 64, decay: float = 0.9):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"model.decay={decay}: must be in [0, 1)")
        self.embed = nn.Embedding(vocab_size, hidden_dim)
        self.head = nn.Linear(hidden_dim, vocab_size)
        self.decay = decay

    def forward(self, idx: torch.Tensor, state=None):
        e = self.embed(idx)                                   # (B, T, H)
        h = e.new_zeros(e.shape[0], e.shape[2]) if state is None else state
        out = []
        for t in range(idx.shape[1]):
            h = self.decay * h + (1 - self.decay) * e[:, t]   # (B, H)
            out.append(h)
        return self.head(torch.stack(out, 1)), h              # (B, T, V), (B, H)
