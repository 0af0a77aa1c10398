"""MambaLM: the selective state-space model of Gu & Dao 2023, in plain PyTorch.

Per channel e of the inner width and state index n, with Δ, B, C computed from the input:
    h_t[e, n] = exp(Δ_t[e] A[e, n]) h_{t-1}[e, n] + Δ_t[e] B_t[n] u_t[e],
    y_t[e] = sum_n C_t[n] h_t[e, n] + D[e] u_t[e],
with A = -exp(A_log) < 0 diagonal. The gradient through time is the product of the exp(Δ A) in
between: a small Δ (the input is skipped) keeps the state and its gradient, a large Δ resets both,
and this choice is made per character. Training runs `selective.selective_scan`, which builds the
(B, T, E, N) gates, inputs and states tile by tile inside the scan and keeps none of them for
backward; sampling does one step. No CUDA or Triton kernel: keep E * N modest on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.layers import CausalConv, RMSNorm, ScanLM, check_dropout, check_positive
from charlm.models.selective import selective_scan
from charlm.models.units import Site


class SelectiveSSM(nn.Module):
    """Mamba's mixer: in_proj -> (x, z); x -> causal conv -> SiLU -> selective SSM; y * SiLU(z) -> out_proj.

    State: (conv window (B, conv_width-1, E), h (B, E, N)).
    """

    def __init__(self, dim: int, expand: int, state_dim: int, dt_rank: int, conv_width: int):
        super().__init__()
        E = expand * dim
        self.dt_rank, self.state_dim = dt_rank, state_dim
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        self.conv = CausalConv(E, conv_width)
        self.x_proj = nn.Linear(E, dt_rank + 2 * state_dim, bias=False)  # low-rank Δ, B, C
        self.dt_proj = nn.Linear(dt_rank, E)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state_dim + 1, dtype=torch.float32)).repeat(E, 1))  # (E, N)
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, dim, bias=False)
        with torch.no_grad():  # the paper's Δ init: softplus(bias) log-uniform in [1e-3, 1e-1]
            nn.init.uniform_(self.dt_proj.weight, -dt_rank**-0.5, dt_rank**-0.5)
            dt = torch.exp(torch.empty(E).uniform_(math.log(1e-3), math.log(1e-1))).clamp_min(1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: torch.Tensor, state: tuple | None, probe: list | None):
        window, h = (None, None) if state is None else state
        u, z = self.in_proj(x).chunk(2, -1)                    # (B, T, E) each
        u, window = self.conv(u, window)                       # (B, T, E), (B, K-1, E)
        u = F.silu(u)
        dt, Bt, Ct = self.x_proj(u).split([self.dt_rank, self.state_dim, self.state_dim], -1)  # (B, T, R), (B, T, N) x2
        dt = F.softplus(self.dt_proj(dt))                      # (B, T, E) Δ
        A = -torch.exp(self.A_log)                             # (E, N)
        if probe is not None:
            probe.append(torch.exp(dt.unsqueeze(-1) * A).mean((-2, -1)))  # (B, T)
        y, h = selective_scan(dt, A, Bt, Ct, u, h)             # (B, T, E), (B, E, N)
        y = y + self.D * u                                     # (B, T, E)
        return self.out_proj(y * F.silu(z)), (window, h)  # (B, T, D); h is a new tensor, not a view


class MambaBlock(nn.Module):
    """x + SSM(RMSNorm(x)): Mamba's homogeneous block, no separate MLP."""

    def __init__(self, dim: int, mixer: SelectiveSSM, dropout: float):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: tuple | None, probe: list | None):
        y, state = self.mixer(self.norm(x), state, probe)      # (B, T, D)
        return x + self.drop(y), state


class MambaLM(ScanLM):
    """Embedding -> Mamba blocks -> RMSNorm -> head. State: per layer (conv window, h), both carried
    so that chunked == whole, also for chunks shorter than the convolution."""

    no_weight_decay = ("A_log",)  # S4D-real spread of decay rates; weight decay would pull them together

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int = 128,
        num_layers: int = 3,
        dropout: float = 0.0,
        expand: int = 2,
        state_dim: int = 16,
        dt_rank: int = 0,
        conv_width: int = 4,
        tie_weights: bool = True,
    ):
        super().__init__()
        check_positive(hidden_dim=hidden_dim, num_layers=num_layers, expand=expand, state_dim=state_dim,
                       conv_width=conv_width)
        check_dropout(dropout)
        if dt_rank < 0:
            raise ValueError(f"model.dt_rank={dt_rank}: must be >= 0 (0: ceil(hidden_dim / 16), as the paper)")
        rank = dt_rank or math.ceil(hidden_dim / 16)
        blocks = [
            MambaBlock(hidden_dim, SelectiveSSM(hidden_dim, expand, state_dim, rank, conv_width), dropout)
            for _ in range(num_layers)
        ]
        self._build(vocab_size, hidden_dim, blocks, RMSNorm(hidden_dim), dropout, tie_weights)
        with torch.no_grad():  # the paper's prenorm rescale: each residual output by 1/sqrt(num_layers)
            for block in blocks:
                block.mixer.out_proj.weight /= math.sqrt(num_layers)

    def unit_sites(self) -> dict[str, Site]:
        """The units: the residual stream after each block (B, T, D), as for the transformer (the scan state is
        E x N numbers per channel, none of them a unit a reader downstream sees alone)."""
        return {f"layer{i}/h": Site(block) for i, block in enumerate(self.blocks)}
