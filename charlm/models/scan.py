"""Parallel scans for the modern recurrent models (minGRU, minLSTM, Hawk, Mamba), and what they share.

All four run a linear, diagonal recurrence h_t = a_t * h_{t-1} + b_t whose gate a_t depends on the
input only, never on h. Training therefore needs no loop over all T steps (about 3 sqrt(T) vectorised
ones here), and the gradient through time is a product of gates with no tanh Jacobian in the chain.
Two scans compute it:

- `log_scan`: a_t in (0, 1) and b_t > 0, both given as logs (minGRU, minLSTM), so h stays positive
  and never underflows: Heinsen's (2023) log-cumsum-exp scan on a GPU, the chunked scan below in log
  space on a CPU (where logcumsumexp is slow); its backward is a reverse chunked scan.
- `linear_scan`: a_t in (0, 1] given as log a_t and real b_t (Hawk's RG-LRU, Mamba's SSM): the
  two-level `chunked_scan`. It only ever multiplies numbers in [0, 1] and adds, so strongly decaying
  gates underflow to their true limit 0, never overflow: the factorised form exp(L_t) * cumsum(exp(-L_k)
  b_k) with L the cumulative log-decay overflows float32 once -L passes 88 (a_t ~ 1e-6 does so in 7 steps).

`sequential_scan` is the plain loop over time they are tested and timed against, and g(x) the paper's
activation. The layers the four models share live in charlm.models.layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def g(x: torch.Tensor) -> torch.Tensor:
    """Feng et al.'s positive activation: x + 1/2 for x >= 0, sigmoid(x) below (continuous at 0)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log g(x), computed without forming g(x): log(x + 1/2) for x >= 0, -softplus(-x) below."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def sequential_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: h_t = a_t * h_{t-1} + b_t by a Python loop over time. a, b: (B, T, ...) -> h (B, T, ...)."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    a, b = torch.broadcast_tensors(a, b)
    out = []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):  # unbind: one backward node, not one per step
        h = a_t * h + b_t                         # (B, ...)
        out.append(h)
    return torch.stack(out, 1)                    # (B, T, ...)


def log_scan(
    log_a: torch.Tensor, log_b: torch.Tensor, log_h0: torch.Tensor | None = None, method: str | None = None,
) -> torch.Tensor:
    """log h for h_t = a_t * h_{t-1} + b_t with a_t in (0, 1), b_t > 0, given log_a, log_b (B, T, ...)
    and log_h0 (B, ...), the log state before the first step (None: h_0 = 0). Differentiable once.

    method: "heinsen" (logcumsumexp, the default on a GPU) or "chunked" (`chunked_scan` in log space,
    the default elsewhere: torch's CPU logcumsumexp costs some 50 times an exp per element).
    """
    method = method or ("heinsen" if log_a.is_cuda else "chunked")
    if method not in ("heinsen", "chunked"):
        raise ValueError(f"log_scan method={method!r}: must be 'heinsen' or 'chunked'")
    dtype = torch.promote_types(log_a.dtype, log_b.dtype)  # one dtype for the in-place steps, also under autocast
    log_a, log_b = log_a.to(dtype), log_b.to(dtype)
    if log_b.shape[1] == 1 and log_h0 is not None:  # one step from a carried state (sampling): no scan
        return torch.logaddexp(log_a + log_h0.to(dtype).unsqueeze(1), log_b)
    if log_h0 is None:
        return _LogScan.apply(log_a, log_b, method)
    return _LogScan.apply(log_a, log_b, method, log_h0.to(dtype))


def heinsen_scan(log_a: torch.Tensor, log_b: torch.Tensor, log_h0: torch.Tensor | None, chunk: int = 64):
    """Per chunk, with A_t = sum_{s<=t} log a_s: log h_t = A_t + log(h_0 + sum_{k<=t} exp(log b_k - A_k)),
    a logcumsumexp (Heinsen 2023); log h carried from chunk to chunk, so that |A_t| stays small
    enough for float32 to resolve."""
    outs = []
    for s in range(0, log_a.shape[1], chunk):
        la, lb = log_a[:, s : s + chunk], log_b[:, s : s + chunk]    # (B, C, ...)
        decay = la.cumsum(1)                                         # (B, C, ...) log a_1 * ... * a_t
        acc = torch.logcumsumexp(lb - decay, 1)                      # (B, C, ...)
        if log_h0 is not None:
            acc = torch.logaddexp(log_h0.unsqueeze(1), acc)          # (B, C, ...)
        outs.append(decay + acc)
        log_h0 = outs[-1][:, -1]                                     # (B, ...) carried to the next chunk
    return torch.cat(outs, 1)                                        # (B, T, ...)


class _LogScan(torch.autograd.Function):
    """The log-space scan, its backward in the same stable terms. With l_t = log h_t,
    l_t = logaddexp(log a_t + l_{t-1}, log b_t), so dl_t/dl_{t-1} = dl_t/dlog a_t = w_t = a_t h_{t-1} / h_t
    in [0, 1] and dl_t/dlog b_t = b_t / h_t: the gradient G_t = dL/dl_t + w_{t+1} G_{t+1} is a reverse
    linear scan (`chunked_scan`), cheaper than autograd through logcumsumexp and never dividing by h."""

    @staticmethod
    def forward(ctx, log_a, log_b, method, log_h0=None):
        if method == "heinsen":
            log_h = heinsen_scan(log_a, log_b, log_h0)
        else:
            start = torch.full_like(log_b[:, 0], -math.inf) if log_h0 is None else log_h0
            log_h = chunked_scan(log_a, log_b, start, log_space=True)
        ctx.save_for_backward(log_a, log_b, log_h, log_h0)
        return log_h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        log_a, log_b, log_h, log_h0 = ctx.saved_tensors
        first = torch.full_like(log_h[:, :1], -math.inf) if log_h0 is None else log_h0.unsqueeze(1)
        w = torch.exp(log_a + torch.cat([first, log_h[:, :-1]], 1) - log_h)            # (B, T, ...) w_t
        G = reverse_gradient(w, grad)                                                  # (B, T, ...)
        g_h0 = None if log_h0 is None else G[:, 0] * w[:, 0]
        return G * w, G * torch.exp(log_b - log_h), None, g_h0


# From this many elements per time step (B x the rest) `chunked_scan` walks the steps one by one: its
# chunks save Python calls at the price of about three passes over a, b and h, and once each call moves
# this much memory the single pass of the plain loop wins (Mamba's 32 x 8 x 256 steps: 2.8x faster on a
# 2-core CPU; minGRU's 32 x 136: the chunks 1.4x faster at T = 64, 2.3x at T = 256).
LOOP_MIN_ELEMENTS = 16384


def chunked_scan(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, reverse: bool = False, log_space: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t without autograd, in about 3 sqrt(T) vectorised steps instead of T.
    reverse: h_t = a_t * h_{t+1} + b_t, from the end. log_space: a, b, h0 and h are logs (b > 0).
    out: where to write h (B, T, ...), a new tensor when None; it may be b itself.

    The first n C of the T steps are cut into n chunks of C = ceil(sqrt(T)). Pass 1 runs the recurrence
    from 0 through every chunk at once (C steps over (B, n, ...)), keeping only each chunk's end value
    and product of gates; these carry the state from chunk to chunk (n steps); pass 2 reruns every chunk
    from its true starting state, writing h. The T - n C < C steps left over run one by one after the
    chunks (before them when reverse). Each step is the loop's own arithmetic; nothing is copied.
    """
    B, T = b.shape[:2]
    out = torch.empty_like(b) if out is None else out

    def step(a_t, h, b_t, out=None):  # a_t * h + b_t
        if log_space:
            return torch.logaddexp(a_t + h, b_t, out=out)
        return torch.addcmul(b_t, a_t, h, out=out)

    if b[:, 0].numel() >= LOOP_MIN_ELEMENTS:                         # big steps: one pass, step by step
        h = h0
        for t in reversed(range(T)) if reverse else range(T):
            h = step(a[:, t], h, b[:, t], out=out[:, t])
        return out
    C = math.isqrt(T - 1) + 1 if T > 1 else 1                        # ceil(sqrt(T))
    n = T // C
    rest = range(n * C, T)                                           # the short last chunk
    h = h0
    for t in reversed(rest) if reverse else ():
        h = step(a[:, t], h, b[:, t], out=out[:, t])
    chunked = (B, n, C, *b.shape[2:])
    ac = a[:, : n * C].reshape(chunked)                              # (B, n, C, ...)
    bc = b[:, : n * C].reshape(chunked)                              # (B, n, C, ...)
    oc = out[:, : n * C].view(chunked)                               # (B, n, C, ...)
    steps, chunks = (range(C - 1, -1, -1), range(n - 1, -1, -1)) if reverse else (range(C), range(n))
    acc, prod = bc[:, :, steps[0]], ac[:, :, steps[0]]               # (B, n, ...) each
    for t in steps[1:]:
        acc = step(ac[:, :, t], acc, bc[:, :, t])
        prod = prod + ac[:, :, t] if log_space else prod * ac[:, :, t]
    starts = torch.empty_like(acc)                                   # (B, n, ...)
    for j in chunks:
        starts[:, j] = h
        h = step(prod[:, j], h, acc[:, j])
    h = starts
    for t in steps:
        h = step(ac[:, :, t], h, bc[:, :, t], out=oc[:, :, t])
    h = out[:, n * C - 1]
    for t in () if reverse else rest:
        h = step(a[:, t], h, b[:, t], out=out[:, t])
    return out                                                       # (B, T, ...)


def reverse_gradient(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """G_t = grad_t + a_{t+1} G_{t+1} (G_T = grad_T), the gradient flowing back through h_t = a_t h_{t-1} + ...;
    a, grad (B, T, ...) -> G (B, T, ...), without autograd."""
    G = torch.empty_like(grad)
    G[:, -1] = grad[:, -1]
    if grad.shape[1] > 1:  # a_{t+1} and grad_t for t < T: views, shifted by one
        chunked_scan(a[:, 1:], grad[:, :-1], G[:, -1], reverse=True, out=G[:, :-1])
    return G


class _LinearScan(torch.autograd.Function):
    """The chunked scan with its own backward: the gradient of a linear scan is a linear scan run
    backwards, g_t = dL/dh_t + a_{t+1} g_{t+1}; then dL/db_t = g_t, dL/da_t = g_t h_{t-1}. Only a,
    h_0 and h are kept for it, not one tensor per step as autograd through a loop would."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        h = chunked_scan(a, b, h0)
        ctx.save_for_backward(a, h0, h)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        a, h0, h = ctx.saved_tensors
        g_ = reverse_gradient(a, grad_h)                                                 # (B, T, ...)
        grad_a = torch.empty_like(g_)                                                    # (B, T, ...)
        torch.mul(g_[:, 1:], h[:, :-1], out=grad_a[:, 1:])
        torch.mul(g_[:, 0], h0, out=grad_a[:, 0])
        return grad_a, g_, a[:, 0] * g_[:, 0]


def linear_scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """h for h_t = a_t * h_{t-1} + b_t with a_t = exp(log_a) in (0, 1] and real b_t; log_a, b (B, T, ...),
    h0 (B, ...) (None: zeros). Stable in float32 for any decay; differentiable (once) in all three."""
    return gated_scan(log_a.exp(), b, h0)


def gated_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """`linear_scan` given the gates a_t in [0, 1] themselves rather than their logs (a model that computes
    them directly saves an exp and a log per element); a, b (B, T, ...), h0 (B, ...) (None: zeros)."""
    dtype = torch.promote_types(a.dtype, b.dtype)  # one dtype for the in-place steps, also under autocast
    if b.shape[1] == 1 and h0 is not None:  # one step from a carried state (sampling): no scan
        return torch.addcmul(b.to(dtype), a.to(dtype), h0.to(dtype).unsqueeze(1))
    a, b = torch.broadcast_tensors(a.to(dtype), b.to(dtype))
    h0 = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(dtype)
    return _LinearScan.apply(a.contiguous(), b.contiguous(), h0.contiguous())


def positive_scan(
    log_a: torch.Tensor, log_b: torch.Tensor, log_h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (B, T, ...), log h_T (B, ...)) for h_t = a_t * h_{t-1} + b_t with a_t in (0, 1) and b_t > 0
    given as logs, log_h0 (B, ...) the log state before the first step (None: h_0 = 0).

    Chosen by the input's device at call time. On a CPU, `linear_scan` on a_t and b_t themselves: with
    gates below 1 and positive inputs h stays positive and below max(h_0, b / (1 - a)), so the plain
    multiply-add cannot overflow, and it is several times cheaper there than logaddexp. Elsewhere
    (a GPU), the log-space `log_scan`, whose logcumsumexp is one kernel.
    """
    if log_a.device.type == "cpu":
        return positive_gated_scan(log_a.exp(), log_b.exp(), log_h0)
    log_h = log_scan(log_a, log_b, log_h0)                                          # (B, T, ...)
    return log_h.exp(), log_h[:, -1].clone()


def positive_gated_scan(
    a: torch.Tensor, b: torch.Tensor, log_h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`positive_scan`'s CPU form given a_t in (0, 1) and b_t > 0 themselves (a model that computes its
    gates directly saves the exp of their logs): (h (B, T, ...), log h_T (B, ...)), the state in and out
    as logs as there."""
    h = gated_scan(a, b, None if log_h0 is None else log_h0.exp())                 # (B, T, ...)
    return h, h[:, -1].log()


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
    One step from a carried state (sampling) runs the recurrence directly.
    """
    dtype = torch.promote_types(dt.dtype, A.dtype)  # float32 also under autocast: products of many gates
    dt, A, Bt, Ct, u = (x.to(dtype) for x in (dt, A, Bt, Ct, u))
    B, T, E = u.shape
    At = A.t()                                                                      # (N, E)
    h0 = u.new_zeros(B, At.shape[0], E) if h0 is None else h0.to(dtype).transpose(1, 2)  # (B, N, E)
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
