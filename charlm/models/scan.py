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

from charlm.models import native


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
    h_0 and h are kept for it, not one tensor per step as autograd through a loop would. On a CPU with
    the compiled kernels (charlm.models.native), both directions are one C loop over time instead."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        h = native.linear_forward(a, b, h0) if native.supports(b) else chunked_scan(a, b, h0)
        ctx.save_for_backward(a, h0, h)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        a, h0, h = ctx.saved_tensors
        if native.supports(h):
            return native.linear_backward(a, h0, h, grad_h.contiguous())
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
