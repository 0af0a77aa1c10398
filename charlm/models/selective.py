"""Mamba's selective scan: the linear recurrence of `scan.chunked_scan` fused with the building of its
input-dependent gate and input and with the read-out, so that training stores none of the (B, T, E, N)
tensors (see `selective_scan`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from charlm.models import native
from charlm.models.scan import chunked_scan


def selective_scan(
    dt: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, Ct: torch.Tensor, u: torch.Tensor,
    h0: torch.Tensor | None = None, block: int = 64, rows: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan, (y (B, T, E), h_T (B, E, N)), with per channel e and state index n
        h_t[e, n] = exp(Δ_t[e] A[e, n]) h_{t-1}[e, n] + Δ_t[e] u_t[e] B_t[n],   y_t[e] = sum_n h_t[e, n] C_t[n];
    dt = Δ and u (B, T, E), A (E, N) <= 0, Bt and Ct (B, T, N), h0 (B, E, N) (None: zeros).

    The (B, T, E, N) gate, input and state are built inside the scan, `rows` batch rows by `block` steps
    at a time, read out at once and dropped: training keeps only the inputs and each tile's starting
    state, and backward builds them again (`_SelectiveScan`), so no (B, T, E, N) tensor outlives a tile.
    Inside, the state index comes before the channel, (B, S, N, E), so that every elementwise step and
    sum runs along the long E axis (256 contiguous numbers at mamba.yaml's size) rather than N (8).
    One step from a carried state (sampling) runs the recurrence directly. On a CPU with the compiled
    kernels (charlm.models.native), the whole scan runs in C instead: the same sums, one pass forward,
    the state in cache (`_NativeSelectiveScan`).
    """
    dtype = torch.promote_types(dt.dtype, A.dtype)  # float32 also under autocast: products of many gates
    dt, A, Bt, Ct, u = (x.to(dtype) for x in (dt, A, Bt, Ct, u))
    B, T, E = u.shape
    At = A.t()                                                                      # (N, E)
    h0 = u.new_zeros(B, At.shape[0], E) if h0 is None else h0.to(dtype).transpose(1, 2)  # (B, N, E)
    if T > 1 and native.supports(u):
        y, h = _NativeSelectiveScan.apply(dt.contiguous(), At.contiguous(), Bt.contiguous(), Ct.contiguous(),
                                          u.contiguous(), h0.contiguous())
        return y, h.transpose(1, 2).contiguous()                                    # (B, T, E), (B, E, N)
    if T == 1:
        a, b = _gate_and_input(dt, At, Bt, u)                                       # (B, 1, N, E) each
        h = torch.addcmul(b[:, 0], a[:, 0], h0)                                     # (B, N, E)
        return (h * Ct[:, 0, :, None]).sum(1).unsqueeze(1), h.transpose(1, 2).contiguous()
    ys, hs = [], []
    for r in range(0, B, rows):
        dt_r, Bt_r, Ct_r, u_r, h0_r = (x[r : r + rows].contiguous() for x in (dt, Bt, Ct, u, h0))
        y, h = _SelectiveScan.apply(dt_r, At.contiguous(), Bt_r, Ct_r, u_r, h0_r, block)
        ys.append(y)
        hs.append(h)
    return torch.cat(ys), torch.cat(hs).transpose(1, 2).contiguous()               # (B, T, E), (B, E, N)


def _gate_and_input(dt: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, u: torch.Tensor):
    """exp(Δ A) and Δ u B: (B, S, E), (N, E), (B, S, N), (B, S, E) -> (B, S, N, E) each."""
    a = torch.exp_(dt.unsqueeze(2) * At)                                            # (B, S, N, E)
    b = Bt.unsqueeze(-1) * (dt * u).unsqueeze(2)                                    # (B, S, N, E)
    return a, b


class _SelectiveScan(torch.autograd.Function):
    """`selective_scan` over one tile of batch rows, `block` steps at a time, with its own backward;
    A transposed (N, E), h0 and h_T (B, N, E).

    Backward walks the blocks from the last, rebuilding each one's a, b and h from its saved starting
    state, then runs the linear scan's reverse recurrence G_t = dL/dh_t + a_{t+1} G_{t+1} (dL/dh_t =
    dL/dy_t C_t, plus the carry from the next block) and reads every gradient off G:
    dL/db = G, dL/dlog a = G a h_{t-1}, hence Δ, A, B, C and u by the chain rule.
    """

    @staticmethod
    def forward(ctx, dt, At, Bt, Ct, u, h0, block):
        T = u.shape[1]
        y, starts, h = torch.empty_like(u), [], h0
        for s in range(0, T, block):
            sl = slice(s, s + block)
            starts.append(h)
            a, b = _gate_and_input(dt[:, sl], At, Bt[:, sl], u[:, sl])             # (B, S, N, E) each
            hs = chunked_scan(a, b, h, out=b)                                       # (B, S, N, E)
            h = hs[:, -1].clone()                                                   # (B, N, E)
            torch.sum(hs.mul_(Ct[:, sl].unsqueeze(-1)), 2, out=y[:, sl])            # (B, S, E)
        ctx.block = block
        ctx.save_for_backward(dt, At, Bt, Ct, u, torch.stack(starts))
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gh_last):
        dt, At, Bt, Ct, u, starts = ctx.saved_tensors
        T, block = u.shape[1], ctx.block
        d_dt, d_u, d_B, d_C, d_At = (torch.empty_like(dt), torch.empty_like(u), torch.empty_like(Bt),
                                     torch.empty_like(Ct), torch.zeros_like(At))
        carry = torch.zeros_like(starts[0]) if gh_last is None else gh_last        # dL/dh at the block's end
        for i, s in reversed(list(enumerate(range(0, T, block)))):
            sl = slice(s, s + block)
            dt_s, u_s, B_s, C_s, gy_s = dt[:, sl], u[:, sl], Bt[:, sl], Ct[:, sl], gy[:, sl]
            a, h = _gate_and_input(dt_s, At, B_s, u_s)
            h = chunked_scan(a, h, starts[i], out=h)                                # (B, S, N, E) rebuilt
            gy_n = gy_s.unsqueeze(2)                                                # (B, S, 1, E)
            G = C_s.unsqueeze(-1) * gy_n                                            # (B, S, N, E) dL/dh_t via y_t
            G[:, -1] += carry
            if G.shape[1] > 1:                                                      # G_t = dL/dh_t + a_{t+1} G_{t+1}
                chunked_scan(a[:, 1:], G[:, :-1], G[:, -1], reverse=True, out=G[:, :-1])
            d_C[:, sl] = (h[:, :, :, None, :] @ gy_n[..., None]).flatten(2)         # (B, S, N) sum over E
            d_xu = (B_s.unsqueeze(-2) @ G).squeeze(-2)                              # (B, S, E) dL/d(Δ u), sum over N
            d_B[:, sl] = (G @ (dt_s * u_s)[..., None]).squeeze(-1)                  # (B, S, N) sum over E
            Ga = G.mul_(a)                                                          # (B, S, N, E) G_t a_t
            carry = Ga[:, 0].clone()                                                # dL/dh before the block
            Ga[:, 1:] *= h[:, :-1]                                                  # dL/dlog a_t = G_t a_t h_{t-1}
            Ga[:, 0] *= starts[i]
            torch.sum(torch.mul(Ga, At, out=a), 2, out=d_dt[:, sl])                 # (B, S, E); a's memory reused
            d_dt[:, sl] += d_xu * u_s
            d_At += torch.mul(Ga, dt_s.unsqueeze(2), out=h).sum((0, 1))             # (N, E); h's memory reused
            d_u[:, sl] = d_xu * dt_s
        return d_dt, d_At, d_B, d_C, d_u, carry, None


class _NativeSelectiveScan(torch.autograd.Function):
    """`selective_scan` by the compiled kernels: forward keeps only its inputs; backward rebuilds each
    batch row's gates and states in C (see charlm/models/kernels.c). h0 and h_T (B, N, E)."""

    @staticmethod
    def forward(ctx, dt, At, Bt, Ct, u, h0):
        ctx.save_for_backward(dt, At, Bt, Ct, u, h0)
        return native.selective_forward(dt, At, Bt, Ct, u, h0)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gh_last):
        gy = gy.contiguous()
        gh_last = None if gh_last is None else gh_last.contiguous()
        return native.selective_backward(*ctx.saved_tensors, gy, gh_last)
