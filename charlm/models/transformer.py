"""GPT: a small causal transformer (nanoGPT-like) whose KV-cache state makes sampling one step per char."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.units import Hold, Site, evaluating, hold_sites


def sinusoidal_positions(block_size: int, n_embd: int) -> torch.Tensor:
    """Fixed sin/cos position table of "Attention is all you need", (block_size, n_embd)."""
    pos = torch.arange(block_size, dtype=torch.float32)[:, None]                                 # (L, 1)
    freq = torch.exp(torch.arange(0, n_embd, 2) * (-math.log(10000.0) / n_embd))             # (C/2,)
    table = torch.zeros(block_size, n_embd)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: n_embd // 2])
    return table


class CausalSelfAttention(nn.Module):
    """Multi-head attention over the cached keys/values plus the new tokens, never looking ahead."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                            # 3 x (B, T, C)
        hd = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        L = 0
        if cache is not None:
            L = cache[0].size(2)
            k = torch.cat([cache[0], k], dim=2)                          # (B, nh, L+T, hd)
            v = torch.cat([cache[1], v], dim=2)                          # (B, nh, L+T, hd)
        if L == 0 or T == 1:  # plain causal, or one new token that may see everything cached
            mask, causal = None, L == 0 and T > 1
        else:  # several new tokens after a cache: query i (position L+i) sees keys 0..L+i
            mask = torch.ones(T, L + T, dtype=torch.bool, device=x.device).tril(diagonal=L)  # (T, L+T)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
        )                                                                 # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                  # (B, T, C)
        return self.resid_drop(self.proj(y)), (k, v)


class Block(nn.Module):
    """Attention then MLP, each with a residual; LayerNorm before ("pre", GPT-2) or after ("post", 2017)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, norm: str):
        super().__init__()
        self.norm = norm
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),                    # (B, T, 4C)
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),                    # (B, T, C)
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, cache=None):
        if self.norm == "pre":
            a, cache = self.attn(self.ln1(x), cache)
            x = x + a
            x = x + self.mlp(self.ln2(x))
        else:
            a, cache = self.attn(x, cache)
            x = self.ln1(x + a)
            x = self.ln2(x + self.mlp(x))
        return x, cache


class GPT(nn.Module):
    """Decoder-only transformer. State: a KV cache {"idx": (B, L), "k"/"v": per layer (B, nh, L, hd)}.

    The cache lets `sample.py` feed one character per step. The model attends to at most
    `block_size` tokens (the positions it was trained on). Past that the window slides: when the
    cache is full, the state keeps the last `block_size // 2` token ids (in "idx") and recomputes
    their keys/values once at positions 0..block_size//2-1, then grows again. Learned positions
    cannot just be shifted, so this rebuild is the price, paid once every block_size/2 tokens.
    Hence the logits of any step equal those of a fresh forward over the ids kept in the state
    (`state["idx"]`, between block_size//2 + 1 and block_size of them), and because rebuilds
    happen at the same token counts however the input is chunked, chunked == whole at any length.
    """

    gpu_precision = "bf16-mixed"  # flash attention and tensor cores, no loss scaling needed
    preferred_sampling = "random"  # attention sees only its window: random windows, as nanoGPT

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        norm: Literal["pre", "post"] = "pre",
        pos: Literal["learned", "sinusoidal"] = "learned",
        tie_weights: bool = True,
    ):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
        if norm not in ("pre", "post"):
            raise ValueError(f"model.norm={norm!r}: must be 'pre' or 'post'")
        if pos not in ("learned", "sinusoidal"):
            raise ValueError(f"model.pos={pos!r}: must be 'learned' or 'sinusoidal'")
        if block_size < 2:
            raise ValueError(f"model.block_size={block_size}: must be >= 2")
        self.block_size = block_size
        self.context_size = block_size  # the contract: attention sees this many characters (sliding-window eval)
        self.wte = nn.Embedding(vocab_size, n_embd)
        if pos == "learned":
            self.wpe = nn.Embedding(block_size, n_embd)
        else:
            self.register_buffer("pos_table", sinusoidal_positions(block_size, n_embd), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias, norm) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias) if norm == "pre" else nn.Identity()  # post-LN ends normed
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _positions(self, start: int, T: int, device) -> torch.Tensor:
        if hasattr(self, "wpe"):
            return self.wpe(torch.arange(start, start + T, device=device))  # (T, C)
        return self.pos_table[start : start + T]                           # (T, C)

    def _step(self, idx: torch.Tensor, state: dict | None, probe: dict | None = None):
        """Feed idx (B, T) after the cache, which must leave room: len(cache) + T <= block_size. `probe`
        collects the residual stream after each block, {layer: [(B, T, C), ...]}."""
        L = 0 if state is None else state["idx"].size(1)
        x = self.drop(self.wte(idx) + self._positions(L, idx.size(1), idx.device))  # (B, T, C)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            cache = None if state is None else (state["k"][i], state["v"][i])
            x, (k, v) = block(x, cache)                                   # (B, T, C); k, v: (B, nh, L+T, hd)
            if probe is not None:
                probe.setdefault(f"layer{i}/h", []).append(x)
            ks.append(k)
            vs.append(v)
        logits = self.head(self.ln_f(x))                                  # (B, T, V)
        seen = idx if state is None else torch.cat([state["idx"], idx], 1)  # (B, L+T)
        return logits, {"idx": seen, "k": ks, "v": vs}

    def forward(self, idx: torch.Tensor, state: dict | None = None):
        return self._walk(idx, state, None)

    def _walk(self, idx: torch.Tensor, state: dict | None, probe: dict | None):
        """forward, with the residual streams of the new tokens (not those of a slide's rebuild) in `probe`."""
        outs = []
        while idx.size(1) > 0:
            if state is not None and state["idx"].size(1) >= self.block_size:  # full: slide the window
                _, state = self._step(state["idx"][:, -(self.block_size // 2) :], None)
            room = self.block_size - (0 if state is None else state["idx"].size(1))
            logits, state = self._step(idx[:, :room], state, probe)       # (B, min(T, room), V)
            outs.append(logits)
            idx = idx[:, room:]
        return torch.cat(outs, 1), state                                  # (B, T, V)

    @torch.no_grad()
    def unit_trace(self, idx: torch.Tensor, state: dict | None = None):
        """The contract's unit hook: ({"layer{i}/h": (B, T, C)}, the residual stream after each block, the KV
        cache forward carries), in eval mode."""
        probe: dict[str, list[torch.Tensor]] = {}
        with evaluating(self):
            _, state = self._walk(idx, state, probe)
        return {k: torch.cat(p, 1).float() for k, p in probe.items()}, state

    def hold_units(self, hold: Hold):
        """The contract's held units: the residual stream after a block held, in every pass (a slide's too)."""
        return hold_sites({f"layer{i}/h": Site(block) for i, block in enumerate(self.blocks)}, hold)
