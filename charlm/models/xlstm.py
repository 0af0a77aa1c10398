"""xLSTM (Beck et al., "xLSTM: Extended Long Short-Term Memory", NeurIPS 2024, arXiv:2405.04517): the LSTM's
authors' answer to its limits, as residual stacks of two blocks.

- sLSTM (`slstm.py`): exponential input gates with a normaliser and a log-space stabiliser, so a large
  input can overwrite what a saturated sigmoid would keep; memory mixing through per-head recurrent
  matrices; a loop over time. In a post-up-projection block (the sLSTM, then a gated MLP).
- mLSTM (`mlstm.py`): a d x d matrix memory per head written as v k^T and read with q; gates from the input
  only, so it trains in a chunkwise-parallel form and samples as a recurrence. In a pre-up-projection block
  (up-projection, causal convolution before q and k, learnable skip, no MLP).

`xLSTM[a:b]` is a stack with mLSTM and sLSTM blocks in the ratio a:b: `model=xlstm model.ratio=7:1`, or an
explicit `model.pattern=mmms`. `model=mlstm` and `model=slstm` are stacks of one kind. Every model's state is
one tuple per block (conv window, C', n', m) or (conv window, c, n, m, h), carried across chunks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from charlm.models.layers import ScanLM, check_dropout, check_positive
from charlm.models.mlstm import MLSTMBlock, MLSTMLayer
from charlm.models.slstm import SLSTMBlock, SLSTMLayer
from charlm.models.units import Site, evaluating


def block_pattern(ratio: str, num_layers: int) -> str:
    """num_layers block kinds, "m" (mLSTM) or "s" (sLSTM), a:b of them as `ratio` says, the sLSTM blocks spread
    evenly and each after the mLSTM blocks of its group: "1:1", 4 -> "msms"; "3:1", 4 -> "mmms"; "0:1" -> all s."""
    a, sep, b = ratio.partition(":")
    if not (sep and a.strip().isdigit() and b.strip().isdigit()) or int(a) + int(b) == 0:
        raise ValueError(f"model.ratio={ratio!r}: must be 'a:b', mLSTM to sLSTM blocks (xLSTM[7:1] is '7:1')")
    share = int(b) / (int(a) + int(b))
    return "".join("s" if math.floor((i + 1) * share) > math.floor(i * share) else "m" for i in range(num_layers))


class XLSTMLM(ScanLM):
    """Embedding -> mLSTM and sLSTM blocks -> LayerNorm -> head, the blocks as `pattern` (or `ratio`) says.

    gate_trace gives, per block, the forget gate f_t and the stabilised input gate i'_t = exp(ĩ_t - m_t),
    averaged over heads (mLSTM) or units (sLSTM), both in [0, 1] ("layer{i}/forget", "layer{i}/input").
    """

    # The reference implementation decays every matrix but the token embedding (its weight_decay_on_embedding
    # is off by default); with tied weights that is the output layer too.
    no_weight_decay = ("embed.weight",)

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int = 104,
        num_layers: int = 4,
        ratio: str = "1:1",
        pattern: str = "",
        dropout: float = 0.0,
        num_heads: int = 4,
        expand: float = 2.0,
        qkv_block: int = 4,
        mlp_mult: float = 4 / 3,
        conv_width: int = 4,
        chunk_size: int = 64,
        tie_weights: bool = True,
    ):
        super().__init__()
        check_positive(hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, expand=expand,
                       qkv_block=qkv_block, mlp_mult=mlp_mult, conv_width=conv_width, chunk_size=chunk_size)
        check_dropout(dropout)
        ratio, pattern = str(ratio), str(pattern)  # a command line's `model.ratio=7` arrives as an int
        if pattern and set(pattern) - {"m", "s"}:
            raise ValueError(f"model.pattern={pattern!r}: one letter per block, m (mLSTM) or s (sLSTM)")
        kinds = pattern or block_pattern(ratio, num_layers)
        self.pattern = kinds
        blocks = []
        for i, kind in enumerate(kinds):
            if kind == "m":
                layer = MLSTMLayer(hidden_dim, expand, num_heads, conv_width, qkv_block, chunk_size, len(kinds))
                blocks.append(MLSTMBlock(hidden_dim, layer, dropout))
            else:
                layer = SLSTMLayer(hidden_dim, num_heads, conv_width, i, len(kinds))
                blocks.append(SLSTMBlock(hidden_dim, layer, mlp_mult, dropout))
        self._build(vocab_size, hidden_dim, blocks, nn.LayerNorm(hidden_dim), dropout, tie_weights)

    def unit_sites(self) -> dict[str, Site]:
        """The units: the residual stream after each block (B, T, D), as for Mamba. An mLSTM head's memory is a
        d x d matrix, no unit a reader downstream sees alone; an sLSTM's h feeds its own gates through R inside
        the fused loop, so a unit held at the cell's output would not be held in its recurrence."""
        return {f"layer{i}/h": Site(block) for i, block in enumerate(self.blocks)}

    @torch.no_grad()
    def gate_trace(self, idx: torch.Tensor, state=None):
        """The contract's per-position hook: ({"layer{i}/forget", "layer{i}/input": (B, T)}, the carried
        state), in eval mode, then every module's mode put back."""
        probe: list[tuple[torch.Tensor, torch.Tensor]] = []
        with evaluating(self):
            _, state = self._run(idx, state, probe)
        out = {}
        for i, (forget, write) in enumerate(probe):
            out[f"layer{i}/forget"], out[f"layer{i}/input"] = forget.float(), write.float()
        return out, state


class MLSTMLM(XLSTMLM):
    """A stack of mLSTM blocks (xLSTM[1:0])."""

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int = 132,
        num_layers: int = 3,
        dropout: float = 0.0,
        num_heads: int = 4,
        expand: float = 2.0,
        qkv_block: int = 4,
        conv_width: int = 4,
        chunk_size: int = 64,
        tie_weights: bool = True,
    ):
        super().__init__(vocab_size, hidden_dim, num_layers, "1:0", "", dropout, num_heads, expand, qkv_block,
                         1.0, conv_width, chunk_size, tie_weights)


class SLSTMLM(XLSTMLM):
    """A stack of sLSTM blocks (xLSTM[0:1])."""

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int = 112,
        num_layers: int = 3,
        dropout: float = 0.0,
        num_heads: int = 4,
        mlp_mult: float = 4 / 3,
        conv_width: int = 4,
        tie_weights: bool = True,
    ):
        super().__init__(vocab_size, hidden_dim, num_layers, "0:1", "", dropout, num_heads, 2.0, 4, mlp_mult,
                         conv_width, 64, tie_weights)
