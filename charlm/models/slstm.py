"""sLSTM: the scalar LSTM with exponential gating of Beck et al., "xLSTM: Extended Long Short-Term Memory"
(NeurIPS 2024, arXiv:2405.04517, section 2.2), and its post-up-projection block (appendix: the sLSTM block).

Per unit, with pre-activations from the input and, per head, from the previous output (memory mixing):
    c_t = f_t c_{t-1} + i_t z_t            cell
    n_t = f_t n_{t-1} + i_t                normaliser
    h_t = o_t c_t / n_t
    z_t = tanh(z̃_t),  i_t = exp(ĩ_t),  f_t = sigmoid(f̃_t),  o_t = sigmoid(õ_t),
    g̃_t = W_g x_t + R_g h_{t-1} + b_g     for g in (z, i, f, o), R_g block-diagonal over heads.
exp(ĩ_t) overflows, so the paper carries a stabiliser in log space:
    m_t = max(log f_t + m_{t-1}, ĩ_t),  i'_t = exp(ĩ_t - m_t),  f'_t = exp(log f_t + m_{t-1} - m_t),
and runs the recurrence on i', f': c and n are then the paper's c and n times exp(-m_t), their ratio
unchanged, every exponent <= 0 and n_t >= 1 (m starts at -inf, so the first step sets m_1 = ĩ_1).
h does not depend on the values m takes, so m carries no gradient: the backward pass is exact without it.

Unlike the mLSTM, the gates see h_{t-1}, so the sLSTM is a loop over time, as the LSTM. Training runs it
as one fused autograd function (`slstm_scan`): the loop forward without building a graph, then its
hand-written backward, a loop in reverse, with R's gradient as one product at the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from charlm.models.layers import CausalConv
from charlm.models.mlstm import MultiHeadNorm

GATES = 4  # (i, f, z, o), in this order along the gate axis


def slstm_forward(wx: torch.Tensor, R: torch.Tensor, c, n, m, h):
    """The stabilised recurrence, no autograd. wx (T, NH, B, 4, d): W x_t + b for the gates (i, f, z, o);
    R (NH, d, 4 d); c, n, m, h (NH, B, d) before the first step. Returns the outputs h (T, NH, B, d), the
    state after the last step and what backward needs: i', f', z, o, sigmoid(f̃), c, n at every step."""
    T, NH, B, _, d = wx.shape
    saved = {k: wx.new_empty(T, NH, B, d) for k in ("i", "f", "z", "o", "sf", "c", "n")}
    hs = wx.new_empty(T, NH, B, d)
    for t in range(T):
        raw = torch.baddbmm(wx[t].view(NH, B, GATES * d), h, R).view(NH, B, GATES, d)  # (NH, B, 4, d)
        i_pre, f_pre, z_pre, o_pre = raw.unbind(2)                                   # (NH, B, d) each
        log_f = F.logsigmoid(f_pre)
        m_new = torch.maximum(log_f + m, i_pre)
        i = torch.exp(i_pre - m_new, out=saved["i"][t])                              # i'_t in (0, 1]
        f = torch.exp(log_f + m - m_new, out=saved["f"][t])                          # f'_t in [0, 1]
        z = torch.tanh(z_pre, out=saved["z"][t])
        o = torch.sigmoid(o_pre, out=saved["o"][t])
        torch.sigmoid(f_pre, out=saved["sf"][t])
        c = torch.addcmul(f * c, i, z, out=saved["c"][t])
        n = torch.addcmul(i, f, n, out=saved["n"][t])
        h = torch.div(o * c, n, out=hs[t])
        m = m_new
    return hs, (c.clone(), n.clone(), m, h.clone()), saved


class _SLSTMScan(torch.autograd.Function):
    """The sLSTM over T steps with its backward written out (m held constant, which is exact). With
    gh_t = dL/dh_t from the output and from step t+1's gates through R:
        dõ = gh c/n o(1-o),  gc = gc_{t+1} f'_{t+1} + gh o/n,  gn = gn_{t+1} f'_{t+1} - gh o c/n^2,
        dz̃ = gc i' (1-z^2),  dĩ = (gc z + gn) i',  df̃ = (gc c_{t-1} + gn n_{t-1}) f' (1 - sigmoid(f̃))."""

    @staticmethod
    def forward(ctx, wx, R, c0, n0, m0, h0):
        hs, (c, n, m, h), saved = slstm_forward(wx, R, c0, n0, m0, h0)
        ctx.save_for_backward(R, c0, n0, h0, hs, *saved.values())
        ctx.mark_non_differentiable(m)
        return hs, c, n, m

    @staticmethod
    @once_differentiable
    def backward(ctx, g_hs, g_c, g_n, _):
        R, c0, n0, h0, hs, i, f, z, o, sf, cs, ns = ctx.saved_tensors
        T, NH, B, d = hs.shape
        g_c = torch.zeros_like(c0) if g_c is None else g_c
        g_n = torch.zeros_like(n0) if g_n is None else g_n
        g_hs = torch.zeros_like(hs) if g_hs is None else g_hs
        g_raw = hs.new_empty(T, NH, B, GATES, d)
        g_h = torch.zeros_like(h0)                                   # dL/dh_t through step t+1's gates
        Rt = R.transpose(1, 2)                                       # (NH, 4 d, d)
        for t in reversed(range(T)):
            c_prev, n_prev = (c0, n0) if t == 0 else (cs[t - 1], ns[t - 1])
            gh = g_hs[t] + g_h
            ratio = cs[t] / ns[t]
            g_c = g_c + gh * o[t] / ns[t]
            g_n = g_n - gh * o[t] * ratio / ns[t]
            gi = (g_c * z[t] + g_n) * i[t]
            gf = (g_c * c_prev + g_n * n_prev) * f[t] * (1 - sf[t])
            gz = g_c * i[t] * (1 - z[t] * z[t])
            go = gh * ratio * o[t] * (1 - o[t])
            torch.stack([gi, gf, gz, go], 2, out=g_raw[t])           # (NH, B, 4, d)
            g_h = torch.bmm(g_raw[t].view(NH, B, GATES * d), Rt)     # (NH, B, d)
            g_c, g_n = g_c * f[t], g_n * f[t]
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])               # (T, NH, B, d)
        g_R = torch.bmm(h_prev.permute(1, 3, 0, 2).reshape(NH, d, T * B),
                        g_raw.permute(1, 0, 2, 3, 4).reshape(NH, T * B, GATES * d))  # (NH, d, 4 d)
        return g_raw, g_R, g_c, g_n, None, g_h


def slstm_scan(wx: torch.Tensor, R: torch.Tensor, state: tuple | None):
    """h (B, T, NH, d) and the state (c, n, m, h), each (B, NH, d), after T steps of the sLSTM.
    wx (B, T, 4, NH, d): W x_t + b for (i, f, z, o); R (NH, d, 4 d); state before the first step (None: empty)."""
    B, T, _, NH, d = wx.shape
    dtype = torch.promote_types(torch.promote_types(wx.dtype, R.dtype), torch.float32)  # also under autocast
    if state is None:
        zeros = wx.new_zeros(NH, B, d, dtype=dtype)
        state = (zeros, zeros, torch.full_like(zeros, -math.inf), zeros)
    else:
        state = tuple(s.transpose(0, 1).to(dtype).contiguous() for s in state)  # (NH, B, d) each
    wx = wx.permute(1, 3, 0, 2, 4).to(dtype).contiguous()            # (T, NH, B, 4, d)
    with torch.autocast(wx.device.type, enabled=False):
        hs, c, n, m = _SLSTMScan.apply(wx, R.to(dtype), *state)
    hs = hs.permute(2, 0, 1, 3)                                      # (B, T, NH, d)
    c, n, m = (s.transpose(0, 1).contiguous() for s in (c, n, m))    # (B, NH, d) each
    return hs, (c, n, m, hs[:, -1].clone(memory_format=torch.contiguous_format))


class SLSTMLayer(nn.Module):
    """The sLSTM with its inputs: i and f from a causal convolution and SiLU of x, z and o from x;
    `num_heads` heads of dim / num_heads units, each with its own recurrent matrix; a head-wise norm.
    W is dense here (the paper makes it head-wise too, for speed at scale).

    State: (conv window (B, conv_width-1, D), c, n, m, h (B, NH, d) each).
    """

    def __init__(self, dim: int, num_heads: int, conv_width: int, block_index: int, num_blocks: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.num_heads={num_heads}: must divide model.hidden_dim={dim}")
        self.heads, d = num_heads, dim // num_heads
        self.conv = CausalConv(dim, conv_width)
        self.w_if = nn.Linear(dim, 2 * dim)                          # ĩ, f̃ from the convolved input
        self.w_zo = nn.Linear(dim, 2 * dim)                          # z̃, õ from the input
        self.recurrent_kernel = nn.Parameter(torch.zeros(num_heads, d, GATES * d))  # R, block-diagonal; zeros
        self.norm = MultiHeadNorm(dim)
        with torch.no_grad():  # the reference implementation's init: "small init", forget biases by a power
            for w in (self.w_if.weight, self.w_zo.weight):  # law over each head's units, per block depth
                nn.init.normal_(w, std=math.sqrt(2 / (5 * dim)))
            self.w_if.bias.zero_()
            self.w_zo.bias.zero_()
            depth = block_index / (num_blocks - 1) if num_blocks > 1 else 0.0
            f_bias = -(-5.0 + 12.0 * torch.linspace(0, 1, d) ** (0.3 + 1.3 * depth))  # 5 down to -7
            self.w_if.bias[dim:] = f_bias.repeat(num_heads)

    def forward(self, x: torch.Tensor, state: tuple | None, probe: list | None):
        window, cell = (None, None) if state is None else (state[0], state[1:])
        B, T, D = x.shape
        xc, window = self.conv(x, window)                            # (B, T, D), (B, K-1, D)
        xc = F.silu(xc)
        wx = torch.cat([self.w_if(xc), self.w_zo(x)], -1).view(B, T, GATES, self.heads, -1)  # (B, T, 4, NH, d)
        h, cell = slstm_scan(wx, self.recurrent_kernel, cell)        # (B, T, NH, d)
        if probe is not None:
            probe.append(_gates(wx, self.recurrent_kernel, state))
        return self.norm(h), (window, *cell)                         # (B, T, D)


@torch.no_grad()
def _gates(wx: torch.Tensor, R: torch.Tensor, state: tuple | None):
    """(forget gate f_t, stabilised input gate i'_t) at each position, in [0, 1], averaged over units: (B, T) each."""
    B, T, _, NH, d = wx.shape
    if state is None:
        zeros = wx.new_zeros(NH, B, d)
        cell = (zeros, zeros, torch.full_like(zeros, -math.inf), zeros)
    else:
        cell = tuple(s.transpose(0, 1).contiguous() for s in state[1:])
    _, _, saved = slstm_forward(wx.permute(1, 3, 0, 2, 4).contiguous(), R, *cell)
    return saved["sf"].mean((1, 3)).t(), saved["i"].mean((1, 3)).t()  # (B, T) each


class SLSTMBlock(nn.Module):
    """The post-up-projection block: x + sLSTM(LayerNorm(x)), then x + MLP(LayerNorm(x)), the MLP gated:
    W_down (GeLU(W_gate x) * W_up x), round(mlp_mult * dim) wide (the paper: 4/3)."""

    def __init__(self, dim: int, layer: SLSTMLayer, mlp_mult: float, dropout: float):
        super().__init__()
        width = max(1, round(mlp_mult * dim))
        self.norm1 = nn.LayerNorm(dim)
        self.layer = layer
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * width, bias=False)              # gate and up branches at once
        self.down = nn.Linear(width, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: tuple | None, probe: list | None):
        y, state = self.layer(self.norm1(x), state, probe)           # (B, T, D)
        x = x + self.drop(y)
        gate, up = self.up(self.norm2(x)).chunk(2, -1)               # (B, T, W) each
        return x + self.drop(self.down(F.gelu(gate) * up)), state    # (B, T, D)
