"""Compiled CPU kernels (kernels.c) for the scans and the causal convolution, built on first use.

On a CPU, PyTorch can only run a scan as whole-tensor passes: Mamba's selective scan then writes and
reads (B, T, N, E) gates and states some 25 times a layer, and the time goes in memory traffic, not
arithmetic. The C loops keep a row's state in cache and do the same sums in one pass forward and two
back. They are built once per source and machine into a cache folder (`CHARLM_KERNELS_DIR`, default
~/.cache/charlm/kernels) and called through ctypes; they split a batch over torch's intra-op threads
with the OpenMP runtime torch has loaded. The causal convolution of Mamba and Hawk (models.layers.CausalConv)
runs the same way: one pass over its input forward and one back. No compiler, a failed build, or
CHARLM_NATIVE=0: `available()` is False and the scans and the convolution run their PyTorch forms, which
compute the same numbers (tests/test_native.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]
TYPES = {torch.float32: ["-DREAL=float", "-DEXP=expf"], torch.float64: ["-DREAL=double", "-DEXP=exp"]}


def available(dtype: torch.dtype = torch.float32) -> bool:
    """True when the kernels for dtype are built (or build now) and CHARLM_NATIVE is not 0."""
    return os.environ.get("CHARLM_NATIVE", "1") != "0" and _library(dtype) is not None


def supports(t: torch.Tensor) -> bool:
    """Whether the kernels can run on this tensor: on the CPU, float32 or float64, their build there."""
    return t.device.type == "cpu" and t.dtype in TYPES and available(t.dtype)


@lru_cache(maxsize=None)
def _library(dtype: torch.dtype) -> ctypes.CDLL | None:
    """kernels.c built for dtype (once per source, flags and machine), loaded; None when it can't be."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    flags = [*FLAGS, *TYPES[dtype]]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *flags, _cpu()]).encode()).hexdigest()
    folder = Path(os.environ.get("CHARLM_KERNELS_DIR", Path.home() / ".cache" / "charlm" / "kernels"))
    target = folder / f"kernels-{key[:16]}.so"
    if not target.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # build aside, then one atomic rename
                built = Path(tmp) / target.name
                subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, target)
        except (OSError, subprocess.SubprocessError) as err:
            print(f"charlm: the compiled CPU scans and convolution could not be built ({err}); using the PyTorch "
                  "scans and convolution", file=sys.stderr)
            return None
    return ctypes.CDLL(str(target))


def _cpu() -> str:
    """What -march=native builds for: the CPU's model and instruction sets (a shared home folder may
    serve machines of several kinds)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    return platform.machine() + "".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))


def _call(name: str, dtype: torch.dtype, sizes: tuple, tensors: tuple) -> None:
    """kernels.c's `name` for dtype on sizes (longs), tensors (pointers; None: NULL) and torch's thread count."""
    args = [ctypes.c_long(s) for s in sizes] + [None if t is None else ctypes.c_void_p(t.data_ptr()) for t in tensors]
    getattr(_library(dtype), name)(*args, ctypes.c_int(_threads(sizes[0])))


def _threads(rows: int) -> int:
    return max(1, min(rows, torch.get_num_threads()))


def selective_forward(dt, At, Bt, Ct, u, h0):
    """y (B, T, E) and h_T (B, N, E) of the selective scan; inputs as kernels.c says, contiguous."""
    B, T, E = u.shape
    y, hT = torch.empty_like(u), torch.empty_like(h0)
    _call("selective_forward", u.dtype, (B, T, E, At.shape[0]), (dt, At, Bt, Ct, u, h0, y, hT))
    return y, hT


def selective_backward(dt, At, Bt, Ct, u, h0, gy, ghT):
    """Gradients (dt, At, Bt, Ct, u, h0) of the selective scan for dL/dy = gy and dL/dh_T = ghT (None: 0)."""
    B, T, E = u.shape
    N, threads = At.shape[0], _threads(B)
    d_dt, d_B, d_C, d_u, d_h0 = (torch.empty_like(x) for x in (dt, Bt, Ct, u, h0))
    d_At = torch.zeros(threads, N, E, dtype=u.dtype)                   # one accumulator per thread
    scratch = torch.empty(threads, 2 * T * N * E + 2 * E, dtype=u.dtype)  # a row's gates and states
    _call("selective_backward", u.dtype, (B, T, E, N),
          (dt, At, Bt, Ct, u, h0, gy, ghT, d_dt, d_At, d_B, d_C, d_u, d_h0, scratch))
    return d_dt, d_At.sum(0), d_B, d_C, d_u, d_h0


def linear_forward(a, x, h0):
    """h (B, T, K) for h_t = a_t h_{t-1} + x_t; a, x (B, T, K), h0 (B, K), contiguous."""
    B, T = x.shape[:2]
    h = torch.empty_like(x)
    _call("linear_forward", x.dtype, (B, T, x[0, 0].numel()), (a, x, h0, h))
    return h


def linear_backward(a, h0, h, gh, ghT=None):
    """(dL/da, dL/dx, dL/dh0) of the linear scan, for dL/dh = gh (B, T, K) and dL/dh_T = ghT (None: 0)."""
    B, T = h.shape[:2]
    d_a, d_x, d_h0 = torch.empty_like(a), torch.empty_like(h), torch.empty_like(h0)
    _call("linear_backward", h.dtype, (B, T, h[0, 0].numel()), (a, h0, h, gh, ghT, d_a, d_x, d_h0))
    return d_a, d_x, d_h0


def conv_forward(x, window, wT, bias):
    """y (B, T, E) of the causal depthwise convolution; x (B, T, E), window (B, K-1, E), wT (K, E), contiguous."""
    B, T, E = x.shape
    y = torch.empty_like(x)
    _call("conv_forward", x.dtype, (B, T, E, wT.shape[0]), (x, window, wT, bias, y))
    return y


def conv_backward(x, window, wT, gy):
    """Gradients (x, window, wT, bias) of the causal convolution for dL/dy = gy (B, T, E)."""
    B, T, E = x.shape
    K, threads = wT.shape[0], _threads(B)
    d_xs = torch.zeros(B, K - 1 + T, E, dtype=x.dtype)                  # (window, x) of each row
    d_wT, d_bias = torch.zeros(threads, K, E, dtype=x.dtype), torch.zeros(threads, E, dtype=x.dtype)  # per thread
    _call("conv_backward", x.dtype, (B, T, E, K), (x, window, wT, gy, d_xs, d_wT, d_bias))
    return d_xs[:, K - 1 :], d_xs[:, : K - 1], d_wT.sum(0), d_bias.sum(0)
