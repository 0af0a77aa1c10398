"""`python scripts/bench_scan.py [--batch 32] [--seq 256] [--repeats 5]`

The scans charlm runs (on a CPU the compiled loops of charlm/models/kernels.c, elsewhere the parallel
forms of charlm/models/scan.py), and one block of each modern recurrent model at its
conf/model YAML size, timed on the CPU against a Python loop over time: forward + backward per call
(median of --repeats, the scan and its loop taking turns). "loop" is the plain recurrence for a scan,
and for a block the block fed one character at a time with its state carried (the sampling path),
autograd through all the steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from charlm.bench import ROOT
from charlm.models.scan import linear_scan, log_scan, positive_gated_scan, sequential_scan
from charlm.models.selective import selective_scan


def timed(fn, inputs: list[torch.Tensor], repeats: int) -> float:
    """Median milliseconds of fn(*inputs) -> loss, then loss.backward(), after one warm-up call
    (synchronised with the GPU at both ends when the inputs are on one)."""
    cuda = inputs[0].is_cuda
    times = []
    for i in range(repeats + 1):
        args = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args).backward()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def timed_pair(parallel, loop, inputs: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """(parallel ms, loop ms): `timed`'s medians with the two taking turns, one call each per turn, so a
    change in the machine's speed during the measurement falls on both sides alike."""
    p, q = [], []
    for _ in range(repeats):
        p.append(timed(parallel, inputs, 1))
        q.append(timed(loop, inputs, 1))
    return statistics.median(p), statistics.median(q)


def scans(B: int, T: int, device: str = "cpu") -> list[tuple[str, str, object, object, list[torch.Tensor]]]:
    """(name, shape, parallel, loop, inputs) for each scan, at the widths of the YAML models."""
    gen = torch.Generator().manual_seed(0)
    out = []
    D = 136  # mingru.yaml's width
    log_a, log_b = -F.softplus(torch.randn(B, T, D, generator=gen)), torch.randn(B, T, D, generator=gen)
    a, b = log_a.exp(), log_b.exp()  # minGRU/minLSTM compute their gate and input directly on a CPU
    out.append(("positive_gated_scan (minGRU)", f"{B}x{T}x{D}", lambda a, b: positive_gated_scan(a, b)[0].sum(),
                lambda a, b: sequential_scan(a, b).sum(), [a.to(device), b.to(device)]))
    for method in ("chunked", "heinsen"):  # the log-space forms positive_scan takes on a GPU
        out.append((f"log_scan {method} (minGRU)", f"{B}x{T}x{D}",
                    lambda la, lb, method=method: log_scan(la, lb, method=method).exp().sum(),
                    lambda la, lb: sequential_scan(la.exp(), lb.exp()).sum(), [log_a.to(device), log_b.to(device)]))
    W = 112  # hawk.yaml's recurrence width
    log_a, b = -F.softplus(torch.randn(B, T, W, generator=gen)), torch.randn(B, T, W, generator=gen)
    out.append(("linear_scan (Hawk RG-LRU)", f"{B}x{T}x{W}", lambda la, b: linear_scan(la, b).sum(),
                lambda la, b: sequential_scan(la.exp(), b).sum(), [log_a.to(device), b.to(device)]))
    E, N = 256, 8  # mamba.yaml: inner width 2 x 128, state 8
    dt = F.softplus(torch.randn(B, T, E, generator=gen) - 3)
    A = -torch.arange(1.0, N + 1).repeat(E, 1)
    Bt, Ct = torch.randn(B, T, N, generator=gen), torch.randn(B, T, N, generator=gen)
    u = torch.randn(B, T, E, generator=gen)
    out.append(("selective_scan (Mamba SSM)", f"{B}x{T}x{E}x{N}", lambda *x: selective_scan(*x)[0].sum(),
                lambda *x: selective_loop(*x).sum(), [t.to(device) for t in (dt, A, Bt, Ct, u)]))
    return out


def selective_loop(dt, A, Bt, Ct, u):
    """Mamba's recurrence step by step: h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = h_t C_t."""
    h, ys = torch.zeros(dt.shape[0], *A.shape, device=dt.device), []  # (B, E, N)
    for t in range(dt.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * Bt[:, t, None, :]
        ys.append((h * Ct[:, t, None, :]).sum(-1))                    # (B, E)
    return torch.stack(ys, 1)                                         # (B, T, E)


def blocks(B: int, T: int, device: str = "cpu") -> list[tuple[str, str, object, object, list[torch.Tensor]]]:
    """(name, shape, parallel, loop, inputs) for the first block of each model built from its YAML (the sLSTM's
    "parallel" side is its fused loop over time, the mLSTM's its chunkwise-parallel form)."""
    from hydra.utils import instantiate

    out = []
    for name in ("mingru", "minlstm", "hawk", "mamba", "slstm", "mlstm"):
        torch.manual_seed(0)
        model = instantiate(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"), vocab_size=65).to(device)
        block, D = model.blocks[0], model.embed.embedding_dim

        def parallel(x, block=block):
            return block(x, None, None)[0].sum()

        def loop(x, block=block):
            state, total = None, 0.0
            for t in range(x.shape[1]):
                y, state = block(x[:, t : t + 1], state, None)
                total = total + y.sum()
            return total

        out.append((f"{name} block", f"{B}x{T}x{D}", parallel, loop, [torch.randn(B, T, D, device=device)]))
    return out


def bench_scans(B: int, T: int, repeats: int) -> list[dict]:
    """scripts/bench.py's rows: each scan and modern block (conf/model sizes), parallel vs a Python loop over time."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name, shape, parallel, loop, inputs in scans(B, T, device) + blocks(B, T, device):
        p, q = timed_pair(parallel, loop, inputs, repeats)
        rows.append({"what": name, "shape": shape, "parallel_ms": p, "loop_ms": q, "speedup": q / p})
        print(f"bench: {name} {shape}: charlm {p:.1f} ms, loop {q:.1f} ms ({q / p:.1f}x)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as many as the machine has)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or cores
    torch.set_num_threads(threads)
    print(f"CPU, {threads} threads, torch {torch.__version__}; forward+backward, median of {args.repeats}, "
          "the two taking turns (ms)")
    print(f"{'what':28} {'shape':>14} {'charlm':>10} {'loop':>10} {'speed-up':>9}")
    for name, shape, parallel, loop, inputs in scans(args.batch, args.seq) + blocks(args.batch, args.seq):
        p, q = timed_pair(parallel, loop, inputs, args.repeats)
        print(f"{name:28} {shape:>14} {p:10.1f} {q:10.1f} {q / p:8.1f}x", flush=True)


if __name__ == "__main__":
    main()
