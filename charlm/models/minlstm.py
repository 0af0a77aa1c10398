"""MinLSTMLM: the minimal LSTM of Feng et al. 2024, "Were RNNs All We Needed?".

Gates and candidate from x_t alone, the forget and input gates normalised to sum to 1:
    f_t = sigmoid(W_f x_t),  i_t = sigmoid(W_i x_t),  f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t),
    h_t = f'_t * h_{t-1} + i'_t * g(W_h x_t),
a linear recurrence run as the same log-space parallel scan as minGRU. The gradient through time is
the product of the f' in between; the normalisation keeps h on the scale of the candidates, and
the output gate and the cell/hidden split of the LSTM are gone. Blocks as in `mingru.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from charlm.models.mingru import MinGRULM, MinLogCell
from charlm.models.scan import log_g


class MinLSTMCell(MinLogCell):
    """minLSTM: forget and input gates; the normalised forget gate f'_t is the memory gate."""

    n_gates = 2

    def log_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kf, ki, cand = self.proj(x).chunk(3, -1)              # (B, T, E) each
        # log f - log i = softplus(-ki) - softplus(-kf); log f' = -softplus(log i - log f), log i' likewise
        diff = F.softplus(-ki) - F.softplus(-kf)              # (B, T, E)
        return -F.softplus(-diff), -F.softplus(diff) + log_g(cand)


class MinLSTMLM(MinGRULM):
    """Embedding -> minLSTM blocks -> LayerNorm -> head: MinGRULM around the minLSTM cell. State: one
    (log h,) per layer, log h (B, E)."""

    cell_class = MinLSTMCell
