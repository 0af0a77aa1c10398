"""HawkLM: the recurrent model of De et al. 2024 ("Griffin"), Hawk: RG-LRU blocks and gated MLPs.

The Real-Gated Linear Recurrent Unit, with gates from the input only:
    r_t = sigmoid(W_a x_t + b_a),  i_t = sigmoid(W_x x_t + b_x),  a_t = a^(c r_t) with a = sigmoid(Λ), c = 8,
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t).
log a_t = -c softplus(-Λ) r_t is computed directly (the paper's exp(-c softplus(Λ) r_t) with Λ negated).
The gradient through time is the product of the a_t in between, which Λ starts close to 1: the
model begins with long memory and learns where to forget (r_t -> 1). sqrt(1 - a_t^2) keeps h at the
scale of its inputs however long it remembers. Training and sampling both use `scan.linear_scan`
(one step of it when sampling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.layers import CausalConv, RMSNorm, ScanLM, check_dropout, check_positive
from charlm.models.scan import linear_scan
from charlm.models.units import Site

C = 8.0  # the paper's constant: a_t = a^(c r_t)


class RGLRU(nn.Module):
    """The RG-LRU over width channels. forward(x (B, T, W), h0 (B, W) or None) -> h (B, T, W).

    W_a and W_x are dense here (the paper makes them block-diagonal over heads, for speed at scale).
    """

    def __init__(self, width: int):
        super().__init__()
        self.gate_a = nn.Linear(width, width)                 # recurrence gate r_t
        self.gate_x = nn.Linear(width, width)                 # input gate i_t
        self.a_param = nn.Parameter(torch.empty(width))      # Λ: a = sigmoid(Λ)
        with torch.no_grad():  # a^c uniform in [0.9, 0.999] (paper): log a = log(u) / c, Λ = logit(a)
            log_a = torch.empty(width).uniform_(0.9, 0.999).log() / C
            self.a_param.copy_(log_a - torch.log(-torch.expm1(log_a)))

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None, probe: list | None) -> torch.Tensor:
        r = torch.sigmoid(self.gate_a(x))                     # (B, T, W)
        i = torch.sigmoid(self.gate_x(x))                     # (B, T, W)
        log_a = -C * F.softplus(-self.a_param) * r            # (B, T, W) log a_t = c r_t log sigmoid(Λ)
        # sqrt(1 - a_t^2), floored so its derivative stays bounded (<= 500) as a_t -> 1
        scale = torch.sqrt((-torch.expm1(2 * log_a)).clamp_min(1e-6))  # (B, T, W)
        b = scale * (i * x)                                   # (B, T, W)
        if probe is not None:
            probe.append(log_a.exp().mean(-1))  # (B, T)
        return linear_scan(log_a, b, h0)                      # (B, T, W); one step when sampling


class RecurrentBlock(nn.Module):
    """Griffin's temporal-mixing block: GeLU(W_g x) * RG-LRU(Conv(W_in x)), projected back to dim.

    State: (conv window (B, conv_width-1, W), h (B, W)).
    """

    def __init__(self, dim: int, width: int, conv_width: int):
        super().__init__()
        self.gate = nn.Linear(dim, width)                     # GeLU branch
        self.inp = nn.Linear(dim, width)                      # recurrent branch
        self.conv = CausalConv(width, conv_width)
        self.lru = RGLRU(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, state: tuple | None, probe: list | None):
        window, h0 = (None, None) if state is None else state
        u, window = self.conv(self.inp(x), window)            # (B, T, W), (B, K-1, W)
        h = self.lru(u, h0, probe)                            # (B, T, W)
        y = F.gelu(self.gate(x)) * h                          # (B, T, W)
        return self.out(y), (window, h[:, -1].clone())        # (B, T, D)


class HawkBlock(nn.Module):
    """Griffin's residual block: x + Rec(RMSNorm(x)), then x + MLP(RMSNorm(x)), the MLP gated:
    W_down (GeLU(W_gate x) * W_up x), mlp_mult * dim wide."""

    def __init__(self, dim: int, width: int, mlp_mult: int, conv_width: int, dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.rec = RecurrentBlock(dim, width, conv_width)
        self.norm2 = RMSNorm(dim)
        self.up = nn.Linear(dim, 2 * mlp_mult * dim)          # gate and up branches at once
        self.down = nn.Linear(mlp_mult * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: tuple | None, probe: list | None):
        y, state = self.rec(self.norm1(x), state, probe)      # (B, T, D)
        x = x + self.drop(y)
        gate, up = self.up(self.norm2(x)).chunk(2, -1)        # (B, T, mD) each
        x = x + self.drop(self.down(F.gelu(gate) * up))       # (B, T, D)
        return x, state


class HawkLM(ScanLM):
    """Embedding -> Hawk blocks -> RMSNorm -> head. State: per layer (conv window, h), both carried
    so that chunked == whole, also for chunks shorter than the convolution."""

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int = 96,
        num_layers: int = 2,
        dropout: float = 0.0,
        rnn_width: int = 0,
        mlp_mult: int = 3,
        conv_width: int = 4,
        tie_weights: bool = True,
    ):
        super().__init__()
        check_positive(hidden_dim=hidden_dim, num_layers=num_layers, mlp_mult=mlp_mult, conv_width=conv_width)
        check_dropout(dropout)
        if rnn_width < 0:
            raise ValueError(f"model.rnn_width={rnn_width}: must be >= 0 (0: 4/3 of hidden_dim, as the paper)")
        width = rnn_width or math.ceil(4 * hidden_dim / 3)
        blocks = [HawkBlock(hidden_dim, width, mlp_mult, conv_width, dropout) for _ in range(num_layers)]
        self._build(vocab_size, hidden_dim, blocks, RMSNorm(hidden_dim), dropout, tie_weights)

    def unit_sites(self) -> dict[str, Site]:
        """The units: each layer's RG-LRU state h (B, T, W). Its channels never mix in the recurrence (the
        gates read the input only), so holding one from the RG-LRU's output on holds it through the scan,
        and in the carried state."""
        return {f"layer{i}/h": Site(block.rec.lru) for i, block in enumerate(self.blocks)}
