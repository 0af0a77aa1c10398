"""MinGRULM: the minimal GRU of Feng et al. 2024, "Were RNNs All We Needed?".

The GRU loses its dependence on h_{t-1} in the gate and the candidate:
    z_t = sigmoid(W_z x_t),  h~_t = g(W_h x_t),  h_t = (1 - z_t) * h_{t-1} + z_t * h~_t,
so the recurrence is linear in h and runs as a parallel scan (`scan.positive_scan`: the plain multiply-add
scan on a CPU, the log-space one on a GPU). The gradient
from h_t back to h_s is the product of the (1 - z) in between: no tanh derivative, no weight matrix,
and a layer that keeps 1 - z near 1 carries it far. g keeps h~ positive so that h has a logarithm.

`MinLogCell` (the scan or one-step update, in log space) and `MinBlock` (the paper's block) are
shared with `minlstm.py`, which only changes the gates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.layers import ScanLM, check_dropout, check_positive
from charlm.models.scan import g, log_g, positive_gated_scan, positive_scan
from charlm.models.units import Site


class MinLogCell(nn.Module):
    """One projection of x to (gate logits, candidate); h_t = keep_t * h_{t-1} + in_t, computed in log space.

    State: log h_T (B, E), so that h never underflows and a sequence cut anywhere continues exactly.
    """

    n_gates = 1

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, (self.n_gates + 1) * inner)

    def log_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log keep_t, log in_t) for x (B, T, dim), each (B, T, E). minGRU: keep = 1 - z, in = z * g(h~)."""
        k, cand = self.proj(x).chunk(2, -1)                   # (B, T, E) each
        return -F.softplus(k), -F.softplus(-k) + log_g(cand)  # log(1 - z), log z + log g(h~)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep_t, in_t) themselves, each (B, T, E): what the CPU's multiply-add scan takes. By default
        the exp of `log_gates`; a cell whose gates have a cheap direct form overrides it."""
        log_keep, log_in = self.log_gates(x)
        return log_keep.exp(), log_in.exp()

    def forward(self, x: torch.Tensor, log_h0: torch.Tensor | None, probe: list | None):
        if x.device.type == "cpu":  # positive_scan's CPU branch without the logs: a sigmoid is cheaper than softplus
            keep, inp = self.gates(x)                         # (B, T, E) each
            if probe is not None:
                probe.append(keep.mean(-1))  # (B, T)
            return positive_gated_scan(keep, inp, log_h0)    # (B, T, E), (B, E)
        log_keep, log_in = self.log_gates(x)                  # (B, T, E) each
        if probe is not None:
            probe.append(log_keep.exp().mean(-1))  # (B, T)
        return positive_scan(log_keep, log_in, log_h0)        # (B, T, E), (B, E)


class MinGRUCell(MinLogCell):
    """minGRU: one gate z_t; 1 - z_t is the memory gate."""

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, cand = self.proj(x).chunk(2, -1)                   # (B, T, E) each
        return torch.sigmoid(-k), torch.sigmoid(k) * g(cand)  # 1 - z, z * g(h~)


class MinBlock(nn.Module):
    """The paper's block: x + W_o cell(LayerNorm(x)), then x + MLP(LayerNorm(x)) if mlp_mult > 0.

    W_o maps the cell's width back to the model's (absent when they match). State: (log h,).
    """

    def __init__(self, cell: MinLogCell, dim: int, inner: int, mlp_mult: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.cell = cell
        self.out = nn.Linear(inner, dim, bias=False) if inner != dim else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.mlp = None
        if mlp_mult > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(
                nn.Linear(dim, mlp_mult * dim),                # (B, T, mD)
                nn.GELU(),
                nn.Linear(mlp_mult * dim, dim),                # (B, T, D)
                nn.Dropout(dropout),
            )

    def forward(self, x: torch.Tensor, state: tuple | None, probe: list | None):
        h, log_h = self.cell(self.norm1(x), None if state is None else state[0], probe)  # (B, T, E), (B, E)
        x = x + self.drop(self.out(h))                         # (B, T, D)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))                    # (B, T, D)
        return x, (log_h,)


def min_blocks(cell_cls: type[MinLogCell], hidden_dim: int, num_layers: int, dropout: float,
               expansion: float, mlp_mult: int) -> list[MinBlock]:
    """num_layers blocks of `cell_cls`, the cell expansion * hidden_dim wide; checks the sizes."""
    check_positive(hidden_dim=hidden_dim, num_layers=num_layers, expansion=expansion)
    check_dropout(dropout)
    if mlp_mult < 0:
        raise ValueError(f"model.mlp_mult={mlp_mult}: must be >= 0 (0: no MLP)")
    inner = round(expansion * hidden_dim)
    if inner < 1:
        raise ValueError(f"model.expansion={expansion}: leaves a cell of width {inner}")
    return [MinBlock(cell_cls(hidden_dim, inner), hidden_dim, inner, mlp_mult, dropout) for _ in range(num_layers)]


class MinGRULM(ScanLM):
    """Embedding -> minGRU blocks -> LayerNorm -> head. State: one (log h,) per layer, log h (B, E).
    A subclass with another `cell_class` (minLSTM) is the same model around another gate."""

    cell_class: type[MinLogCell] = MinGRUCell

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int = 128,
        num_layers: int = 3,
        dropout: float = 0.0,
        expansion: float = 1.0,
        mlp_mult: int = 2,
        tie_weights: bool = True,
    ):
        super().__init__()
        blocks = min_blocks(self.cell_class, hidden_dim, num_layers, dropout, expansion, mlp_mult)
        self._build(vocab_size, hidden_dim, blocks, nn.LayerNorm(hidden_dim), dropout, tie_weights)

    def unit_sites(self) -> dict[str, Site]:
        """The units: each layer's scan state h (B, T, E), the cell's output. Its channels never mix in the
        recurrence, so holding one from its output on is holding it through the scan."""
        return {f"layer{i}/h": Site(block.cell) for i, block in enumerate(self.blocks)}
