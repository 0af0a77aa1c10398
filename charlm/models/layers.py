"""The layers the modern recurrent models (minGRU, minLSTM, Hawk, Mamba) share.

The short causal convolution whose last inputs travel in the state, RMSNorm, the language-model shell
(embedding -> blocks -> norm -> head) and the checks of their sizes. The scans themselves are in
charlm.models.scan.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from charlm.models import native
from charlm.models.units import Hold, Site, evaluating, hold_sites, site_trace


class CausalConv(nn.Module):
    """Depthwise convolution over time that sees the current and the width-1 previous inputs.

    Its state is the window of the width-1 inputs before this call (zeros at the start), so a sequence
    fed in chunks, even of one character, meets the same inputs as whole. Written as a sum of shifted
    products rather than F.conv1d so that every output is the same arithmetic however the input is cut.
    On a CPU with the compiled kernels (charlm.models.native) the same sums run in C, in the same order.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.uniform_(self.weight, -1 / math.sqrt(width), 1 / math.sqrt(width))  # as nn.Conv1d, fan_in = width

    def forward(self, x: torch.Tensor, window: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, E = x.shape
        if window is None:
            window = x.new_zeros(B, self.width - 1, E)
        if native.supports(x) and window.dtype == self.weight.dtype == x.dtype:  # the same sums, in C
            y = _NativeCausalConv.apply(x.contiguous(), window.contiguous(), self.weight, self.bias)
        else:
            xs = torch.cat([window, x], 1)                            # (B, width-1+T, E)
            y = self.bias.expand(B, T, E)
            for k in range(self.width):
                y = y + xs[:, k : k + T] * self.weight[:, k]          # (B, T, E)
        keep = self.width - 1  # the next window: the last width-1 inputs of (window, x)
        return y, (x[:, T - keep :] if T >= keep else torch.cat([window[:, T:], x], 1)).clone()  # (B, width-1, E)


class _NativeCausalConv(torch.autograd.Function):
    """CausalConv by the compiled kernels (charlm/models/kernels.c): one pass over the input forward and
    one back, instead of 2 x width whole-tensor products and sums. x (B, T, E), window (B, width-1, E)."""

    @staticmethod
    def forward(ctx, x, window, weight, bias):
        wT = weight.t().contiguous()                                  # (width, E)
        ctx.save_for_backward(x, window, wT)
        return native.conv_forward(x, window, wT, bias.contiguous())

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        d_x, d_window, d_wT, d_bias = native.conv_backward(*ctx.saved_tensors, gy.contiguous())
        return d_x, d_window, d_wT.t(), d_bias


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension (nn.RMSNorm only arrived in torch 2.4)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ScanLM(nn.Module):
    """Embedding -> residual blocks -> final norm -> linear head, the shell of the four models.

    Each block is called as `x, layer_state = block(x, layer_state, probe)` with x (B, T, D) and
    layer_state a tuple of tensors (None at the start); `probe`, a list or None, collects the block's
    memory-gate opening at each position, (B, T) averaged over units, for `gate_openings`/`gate_trace`.
    The model's state is the tuple of layer states, copies rather than views of the (B, T, ...)
    activations, so a carried or saved state holds only itself.
    """

    preferred_sampling = "stream"  # recurrent: truncated BPTT with the state carried past the window
    gpu_precision = "32-true"  # products of gates over hundreds of steps: bf16's 8-bit mantissa blurs a ~ 0.999
    context_size = None  # the state carries all the past: evaluated as streams

    def _build(self, vocab_size: int, hidden_dim: int, blocks: list[nn.Module], norm: nn.Module,
               dropout: float, tie_weights: bool) -> None:
        self.embed = nn.Embedding(vocab_size, hidden_dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # as GPT-2 and Mamba: tied logits start near uniform
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = nn.Linear(hidden_dim, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.embed.weight

    def _run(self, idx: torch.Tensor, state, probe: list | None):
        x = self.drop(self.embed(idx))                                # (B, T, D)
        states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if state is None else state[i], probe)  # (B, T, D)
            states.append(s)
        return self.head(self.norm(x)), tuple(states)                 # (B, T, V)

    def forward(self, idx: torch.Tensor, state=None):
        return self._run(idx, state, None)

    @torch.no_grad()
    def gate_openings(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer, the mean opening of the memory gate (1: keep the past, 0: forget it) on idx, as
        0-d tensors keyed "layer{i}/retain". Runs in eval mode, then puts every module's mode back."""
        return {k: v.mean() for k, v in self.gate_trace(idx)[0].items()}

    @torch.no_grad()
    def gate_trace(self, idx: torch.Tensor, state=None):
        """The contract's per-position hook: ({"layer{i}/retain": (B, T) opening}, the carried state),
        in eval mode, then every module's mode put back."""
        probe: list[torch.Tensor] = []
        with evaluating(self):
            _, state = self._run(idx, state, probe)
        return {f"layer{i}/retain": p.float() for i, p in enumerate(probe)}, state

    def unit_sites(self) -> dict[str, Site]:
        """Where each layer's units live, {"layer{i}/h": Site}: a subclass names them (charlm.models.units)."""
        raise NotImplementedError

    @torch.no_grad()
    def unit_trace(self, idx: torch.Tensor, state=None):
        """The contract's unit hook: ({"layer{i}/h": (B, T, U)} at the sites `unit_sites` names, the carried
        state), in eval mode, then every module's mode put back."""
        acts, (_, state) = site_trace(self, self.unit_sites(), lambda: self._run(idx, state, None))
        return acts, state

    def hold_units(self, hold: Hold):
        """The contract's held units: a context inside which the sites' held units keep their values."""
        return hold_sites(self.unit_sites(), hold)


def check_positive(**values) -> None:
    """Raise ValueError naming `model.KEY=value` for a size that is not positive."""
    for key, v in values.items():
        if v <= 0:
            raise ValueError(f"model.{key}={v}: must be positive")


def check_dropout(dropout: float) -> None:
    if not 0 <= dropout < 1:
        raise ValueError(f"model.dropout={dropout}: must be in [0, 1)")
