"""mLSTM: the matrix-memory LSTM of Beck et al., "xLSTM: Extended Long Short-Term Memory" (NeurIPS 2024,
arXiv:2405.04517, section 2.3), and its pre-up-projection block (appendix: the mLSTM block).

Per head, with q_t, k_t, v_t in R^d (k_t = W_k x_t / sqrt(d)) and two scalar gates from the input only:
    C_t = f_t C_{t-1} + i_t v_t k_t^T          matrix memory (d x d)
    n_t = f_t n_{t-1} + i_t k_t                normaliser
    h~_t = C_t q_t / max(|n_t^T q_t|, 1)
    i_t = exp(ĩ_t),  f_t = sigmoid(f̃_t)        exponential input gate, sigmoid forget gate
The exponential gate overflows, so the paper keeps a stabiliser in log space (section 2.2):
    m_t = max(log f_t + m_{t-1}, ĩ_t),  i'_t = exp(ĩ_t - m_t),  f'_t = exp(log f_t + m_{t-1} - m_t),
with C'_t = C_t exp(-m_t), n'_t = n_t exp(-m_t) stored instead: h~_t = C'_t q_t / max(|n'_t^T q_t|, exp(-m_t)),
the same number with every exponent <= 0. h~ does not depend on the values m takes (only C' and n' scale
with it), so m carries no gradient here: it is computed without autograd, which is exact.

There is no memory mixing (the gates never see h), so training runs the recurrence in its chunkwise-parallel
form (`mlstm_chunkwise`): inside a chunk of L steps the quadratic, stabilised form (an L x L causal matrix
of decayed q.k products, like attention), from chunk to chunk the carried (C', n', m). One step of it is the
recurrent form, which sampling runs. The state starts at m = -inf, where the first step sets m_1 = ĩ_1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.layers import CausalConv


def mlstm_chunkwise(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i_pre: torch.Tensor, log_f: torch.Tensor,
    state: tuple | None = None, chunk: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """h~ (B, NH, T, d) and the state (C' (B, NH, d, d), n' (B, NH, d), m (B, NH)) after T steps.

    q, k, v (B, NH, T, d) with k already scaled by 1/sqrt(d); i_pre = ĩ and log_f = log f_t (B, NH, T);
    state: (C', n', m) before the first step (None: empty). `chunk` steps at a time in the quadratic form;
    chunk >= T is the fully parallel form, chunk = 1 the recurrence.
    """
    T = q.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32 also under autocast: sums of gated products
    q, k, v, i_pre, log_f = (x.to(dtype) for x in (q, k, v, i_pre, log_f))
    carried = None if state is None else tuple(s.to(dtype) for s in state)
    outs = []
    with torch.autocast(q.device.type, enabled=False):
        for s in range(0, T, chunk):
            h, carried = _chunk(q[:, :, s : s + chunk], k[:, :, s : s + chunk], v[:, :, s : s + chunk],
                                i_pre[:, :, s : s + chunk], log_f[:, :, s : s + chunk], carried)
            outs.append(h)
    return torch.cat(outs, 2), carried                                  # (B, NH, T, d)


def _chunk(q, k, v, i_pre, log_f, carried):
    """One chunk of L steps from carried = (C0', n0', m0) (None: empty): with F_t = sum_{r<=t} log f_r in it,
        C_t = exp(F_t + m0) C0' + sum_{s<=t} exp(F_t - F_s + ĩ_s) v_s k_s^T,
    each term divided by exp(m_t), m_t the largest of those exponents (the recurrence's own m_t)."""
    L = q.shape[2]
    Fc = log_f.cumsum(-1)                                               # (B, NH, L)
    log_D = Fc.unsqueeze(-1) - Fc.unsqueeze(-2) + i_pre.unsqueeze(-2)   # (B, NH, L, L): [t, s]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    log_D = log_D.masked_fill(~causal, -math.inf)                       # (B, NH, L, L)
    with torch.no_grad():  # the stabiliser: h~ is the same for any m, so no gradient flows through it
        m = log_D.amax(-1)                                              # (B, NH, L)
        if carried is not None:
            m = torch.maximum(m, Fc + carried[2].unsqueeze(-1))
    D = torch.exp(log_D - m.unsqueeze(-1))                              # (B, NH, L, L), entries in [0, 1]
    S = (q @ k.transpose(-1, -2)) * D                                   # (B, NH, L, L) decayed q_t . k_s
    num, qn = S @ v, S.sum(-1)                                          # (B, NH, L, d) C'_t q_t, (B, NH, L) n'_t . q_t
    last = D[:, :, -1].unsqueeze(-1)                                    # (B, NH, L, 1) weights at the chunk's end
    C = (v * last).transpose(-1, -2) @ k                                # (B, NH, d, d) sum_s D[L, s] v_s k_s^T
    n = (k * last).sum(-2)                                              # (B, NH, d)
    if carried is not None:                                             # the carried memory, decayed to each t
        C0, n0, m0 = carried
        w = torch.exp(Fc + m0.unsqueeze(-1) - m)                        # (B, NH, L), in [0, 1]
        num = num + w.unsqueeze(-1) * (q @ C0.transpose(-1, -2))        # (B, NH, L, d)
        qn = qn + w * (q @ n0.unsqueeze(-1)).squeeze(-1)                # (B, NH, L)
        C = C + w[..., -1, None, None] * C0
        n = n + w[..., -1, None] * n0
    h = num / torch.maximum(qn.abs(), torch.exp(-m)).unsqueeze(-1)      # (B, NH, L, d)
    return h, (C, n, m[..., -1].clone())


class HeadwiseLinear(nn.Module):
    """A block-diagonal linear map, `width / block` independent blocks of block x block (the paper's q, k, v
    projections, blocks of 4): x (..., width) -> (..., width)."""

    def __init__(self, width: int, block: int):
        super().__init__()
        self.block = block
        self.weight = nn.Parameter(torch.empty(width // block, block, block))
        nn.init.normal_(self.weight, std=math.sqrt(2 / (5 * block)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.unflatten(-1, (-1, self.block))                          # (..., width/block, block)
        return torch.einsum("...ni,nio->...no", xs, self.weight).flatten(-2)  # (..., width)


class MultiHeadNorm(nn.Module):
    """LayerNorm over each head's d units separately, then a learned scale (the paper's group norm):
    x (B, T, NH, d) -> (B, T, NH * d)."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps).flatten(-2) * self.weight  # (B, T, NH * d)


class MLSTMLayer(nn.Module):
    """The pre-up-projection block's inside: up-projection to two branches of `expand * dim`; on the left a
    causal convolution and SiLU give q and k (v comes before the convolution), the mLSTM cell, the head-wise
    norm and a learnable skip from the convolution; the right branch gates it through SiLU (the cell's
    output gate o_t); down-projection.

    State: (conv window (B, conv_width-1, E), C' (B, NH, d, d), n' (B, NH, d), m (B, NH)).
    """

    def __init__(self, dim: int, expand: float, num_heads: int, conv_width: int, qkv_block: int,
                 chunk_size: int, num_blocks: int):
        super().__init__()
        E = round(expand * dim)
        if E % num_heads or E % qkv_block:
            raise ValueError(f"model.expand={expand}: the inner width {E} must divide by model.num_heads="
                             f"{num_heads} and model.qkv_block={qkv_block}")
        self.heads, self.chunk_size = num_heads, chunk_size
        self.up = nn.Linear(dim, 2 * E, bias=False)
        self.conv = CausalConv(E, conv_width)
        self.q, self.k, self.v = (HeadwiseLinear(E, qkv_block) for _ in range(3))
        self.igate = nn.Linear(3 * E, num_heads)                        # ĩ_t per head, from (q, k, v)
        self.fgate = nn.Linear(3 * E, num_heads)                        # f̃_t per head
        self.norm = MultiHeadNorm(E)
        self.skip = nn.Parameter(torch.ones(E))                         # the learnable skip
        self.down = nn.Linear(E, dim, bias=False)
        with torch.no_grad():  # the reference implementation's init
            nn.init.normal_(self.up.weight, std=math.sqrt(2 / (5 * dim)))           # "small init"
            nn.init.normal_(self.down.weight, std=2 / num_blocks / math.sqrt(dim))  # Wang's init
            nn.init.zeros_(self.igate.weight)
            nn.init.normal_(self.igate.bias, std=0.1)
            nn.init.zeros_(self.fgate.weight)
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, num_heads))  # f = sigmoid(3..6): 0.95..0.998

    def forward(self, x: torch.Tensor, state: tuple | None, probe: list | None):
        window, cell = (None, None) if state is None else (state[0], state[1:])
        B, T, _ = x.shape
        xm, z = self.up(x).chunk(2, -1)                                 # (B, T, E) each
        xc, window = self.conv(xm, window)                              # (B, T, E), (B, K-1, E)
        xc = F.silu(xc)
        q, k, v = self.q(xc), self.k(xc), self.v(xm)                    # (B, T, E) each
        qkv = torch.cat([q, k, v], -1)                                  # (B, T, 3E)
        i_pre = self.igate(qkv).transpose(1, 2)                         # (B, NH, T)
        log_f = F.logsigmoid(self.fgate(qkv)).transpose(1, 2)           # (B, NH, T)
        d = q.shape[-1] // self.heads

        def heads(t):
            return t.view(B, T, self.heads, d).transpose(1, 2)          # (B, NH, T, d)

        h, cell = mlstm_chunkwise(heads(q), heads(k) / math.sqrt(d), heads(v), i_pre, log_f, cell, self.chunk_size)
        if probe is not None:
            probe.append(stabilised_gates(i_pre, log_f, None if state is None else state[3]))
        h = self.norm(h.transpose(1, 2)) + self.skip * xc               # (B, T, E)
        return self.down(h * F.silu(z)), (window, *cell)                # (B, T, D)


@torch.no_grad()
def stabilised_gates(i_pre: torch.Tensor, log_f: torch.Tensor, m0: torch.Tensor | None):
    """(forget gate f_t, stabilised input gate i'_t = exp(ĩ_t - m_t)) at each position, averaged over heads:
    both computed in log space and in [0, 1]. i_pre, log_f (B, NH, T); m0 (B, NH) the stabiliser before the
    first step (None: -inf). With F_t = sum_{r<=t} log f_r, m_t = F_t + max(m0, max_{s<=t} (ĩ_s - F_s))."""
    Fc = log_f.cumsum(-1)                                               # (B, NH, T)
    best = (i_pre - Fc).cummax(-1).values                               # (B, NH, T)
    if m0 is not None:
        best = torch.maximum(best, m0.unsqueeze(-1))
    return log_f.exp().mean(1), (i_pre - Fc - best).exp().mean(1)       # (B, T) each


class MLSTMBlock(nn.Module):
    """x + MLSTMLayer(LayerNorm(x)): the pre-up-projection residual block (no separate MLP)."""

    def __init__(self, dim: int, layer: MLSTMLayer, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layer = layer
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: tuple | None, probe: list | None):
        y, state = self.layer(self.norm(x), state, probe)               # (B, T, D)
        return x + self.drop(y), state
