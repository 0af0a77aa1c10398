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
        w_next = torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], 1)                  # (B, T, ...) w_{t+1}
        G = chunked_scan(w_next, grad.contiguous(), torch.zeros_like(log_h[:, 0]), reverse=True)  # (B, T, ...)
        g_h0 = None if log_h0 is None else G[:, 0] * w[:, 0]
        return G * w, G * torch.exp(log_b - log_h), None, g_h0


def chunked_scan(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, reverse: bool = False, log_space: bool = False,
) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t without autograd, in about 3 sqrt(T) vectorised steps instead of T.
    reverse: h_t = a_t * h_{t+1} + b_t, from the end. log_space: a, b, h0 and h are logs (b > 0).

    The T steps are cut into n chunks of C. Pass 1 runs the recurrence from 0 through every chunk at
    once (C steps over (B, n, ...)), keeping only each chunk's end value and product of gates; these
    carry the state from chunk to chunk (n steps); pass 2 reruns every chunk from its true starting
    state, writing h. Each step is the loop's own arithmetic, and a, b are read twice, h written once.
    """
    B, T = b.shape[:2]
    C = math.isqrt(T - 1) + 1 if T > 1 else 1                       # ceil(sqrt(T))
    n = -(-T // C)
    pad = n * C - T
    if pad:  # a = 1, b = 0 past the end: they pass the state through unchanged
        one, zero = (0.0, -math.inf) if log_space else (1.0, 0.0)
        a = torch.cat([a, a.new_full((B, pad, *a.shape[2:]), one)], 1)
        b = torch.cat([b, b.new_full((B, pad, *b.shape[2:]), zero)], 1)
    a = a.reshape(B, n, C, *a.shape[2:])                             # (B, n, C, ...)
    b = b.reshape(B, n, C, *b.shape[2:])                             # (B, n, C, ...)
    steps, chunks = (range(C - 1, -1, -1), range(n - 1, -1, -1)) if reverse else (range(C), range(n))

    def step(a_t, h, b_t, out=None):  # a_t * h + b_t
        if log_space:
            return torch.logaddexp(a_t + h, b_t, out=out)
        return torch.addcmul(b_t, a_t, h, out=out)

    first = steps[0]
    acc, prod = b[:, :, first], a[:, :, first]                       # (B, n, ...) each
    for t in steps[1:]:
        acc = step(a[:, :, t], acc, b[:, :, t])
        prod = prod + a[:, :, t] if log_space else prod * a[:, :, t]
    starts = torch.empty_like(acc)                                    # (B, n, ...)
    h = h0
    for j in chunks:
        starts[:, j] = h
        h = step(prod[:, j], h, acc[:, j])
    out = torch.empty_like(b)                                         # (B, n, C, ...)
    h = starts
    for t in steps:
        h = step(a[:, :, t], h, b[:, :, t], out=out[:, :, t])
    return out.reshape(B, n * C, *out.shape[3:])[:, :T]              # (B, T, ...)


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
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)                    # (B, T, ...) a_{t+1}
        g_ = chunked_scan(a_next, grad_h.contiguous(), torch.zeros_like(h0), reverse=True)  # (B, T, ...)
        grad_a = torch.empty_like(g_)                                                    # (B, T, ...)
        torch.mul(g_[:, 1:], h[:, :-1], out=grad_a[:, 1:])
        torch.mul(g_[:, 0], h0, out=grad_a[:, 0])
        return grad_a, g_, a[:, 0] * g_[:, 0]


def linear_scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """h for h_t = a_t * h_{t-1} + b_t with a_t = exp(log_a) in (0, 1] and real b_t; log_a, b (B, T, ...),
    h0 (B, ...) (None: zeros). Stable in float32 for any decay; differentiable (once) in all three."""
    dtype = torch.promote_types(log_a.dtype, b.dtype)  # one dtype for the in-place steps, also under autocast
    log_a, b = torch.broadcast_tensors(log_a.to(dtype), b.to(dtype))
    h0 = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(dtype)
    return _LinearScan.apply(log_a.exp().contiguous(), b.contiguous(), h0.contiguous())
