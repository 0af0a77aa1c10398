"""The timing window both training sides of scripts/bench.py share (charlm.bench.child): steps timed in
slices, the two sides taking turns on the machine through two named pipes (`Turns`), and each process's
own memory.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
SLICES = 24  # turns each side takes in a run: its timed steps cut into this many slices
SYNC_PROBE = 10  # CUDA only: steps after the timed window run under torch's sync debug mode, counting host syncs


def status_mb(key: str) -> float:
    """A size from Linux's /proc/self/status (VmRSS, VmHWM) in MB, else nan."""
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident set size (Linux), else nan."""
    return status_mb("VmRSS")


def memory(rss0: float, cuda: bool = CUDA) -> dict:
    """Peak RSS of this process so far, its growth since `rss0`, and the CUDA peak when there is one.

    The peak is Linux's VmHWM, the high-water mark of this program's own memory: `ru_maxrss` of a child
    started by fork and exec begins at its parent's RSS at the fork (the bench's parent, holding every
    model it sampled, then passes its ~530 MB to every child it starts). Elsewhere `ru_maxrss`."""
    peak = status_mb("VmHWM")
    if peak != peak:  # nan: no /proc
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return {"peak_rss_mb": peak, "rss_growth_mb": peak - rss0,
            **({"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {})}


def sync() -> None:
    if CUDA and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Turns:
    """Two measuring processes taking turns on the machine through two named pipes (made by the parent):
    a process runs only while it holds the turn, and hands it over by writing one byte to the other's
    pipe, then waits for a byte on its own. The side that does not start waits before its first step;
    each side hands over after each timed slice; after its last, the side that started waits for the
    other's last slice, the other goes on. Both first meet once, so that neither's start-up (imports,
    building) runs during the other's slices."""

    def __init__(self, spec: dict):
        self.mine = os.open(spec["my_pipe"], os.O_RDWR)  # read-write: opening never blocks on the other end
        self.theirs = os.open(spec["their_pipe"], os.O_RDWR)
        self.first = spec["first"]
        self.hand_over(wait=True)  # both ready (start-up done) before either starts its steps
        if not self.first:
            self.wait()

    def wait(self) -> None:
        os.read(self.mine, 1)

    def hand_over(self, wait: bool) -> None:
        os.write(self.theirs, b".")
        if wait:
            self.wait()


class Window:
    """Times steps warmup+1..steps in slices of `slice` steps (synced at both ends of each); on CUDA
    then counts host syncs over SYNC_PROBE steps.

    With `turns` in the spec, charlm and the bare loop run at once in two processes and take turns
    slice by slice (`Turns`): each slice of one side sits next to a slice of the other in time, so
    both meet the same machine (a 2-core VM drifts by 30% over tens of seconds), and the time spent
    waiting for the turn is not counted. tokens_per_s is the whole window's rate over its own slices;
    `slices` keeps each one's rate, for the parent's paired ratios."""

    def __init__(self, spec: dict):
        self.warmup, self.steps, self.done, self.result, self.rss0 = spec["warmup"], spec["steps"], 0, {}, rss_mb()
        self.step_tokens = spec["batch_size"] * spec["block_size"]
        self.slice = spec.get("slice") or max(1, (self.steps - self.warmup) // SLICES)
        self.rates: list[float] = []
        self.spans: list[tuple[float, float]] = []  # each slice's (start, end) clock
        self.seconds = 0.0
        self.turns = Turns(spec["turns"]) if spec.get("turns") else None
        self.t0 = None

    @property
    def complete(self) -> bool:
        """Every figure measured: the timed steps, and on CUDA the host-sync probe after them."""
        return self.done >= self.steps + (SYNC_PROBE if CUDA else 0) and bool(self.result)

    def step_done(self) -> None:
        self.done += 1
        timed = self.done - self.warmup
        if timed == 0:
            sync()
            self.t0 = time.perf_counter()
        elif timed > 0 and (timed % self.slice == 0 or self.done == self.steps) and self.done <= self.steps:
            sync()
            end = time.perf_counter()  # CLOCK_MONOTONIC on Linux: comparable across processes
            seconds = end - self.t0
            self.spans.append((self.t0, end))
            self.seconds += seconds
            steps = timed - self.slice * len(self.rates)  # this slice's (the last one may be short)
            self.rates.append(self.step_tokens * steps / seconds)
            last = self.done == self.steps
            if self.turns is not None:  # the first side also waits after its last slice: the other's is to come
                self.turns.hand_over(wait=not last or self.turns.first)
            self.t0 = time.perf_counter()
            if last:
                self._finish()
        elif CUDA and self.done == self.steps + SYNC_PROBE:
            torch.cuda.set_sync_debug_mode(0)
            self._catch.__exit__(None, None, None)
            syncs = [w for w in self._seen if "synchroniz" in str(w.message)]
            self.result["host_syncs_per_step"] = len(syncs) / SYNC_PROBE
            self.result["host_sync_sites"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})

    def _finish(self) -> None:
        self.result = {"tokens_per_s": self.step_tokens * (self.steps - self.warmup) / self.seconds,
                       "seconds": self.seconds, "slices": self.rates, "spans": self.spans,
                       **memory(self.rss0)}
        if CUDA:
            self._catch = warnings.catch_warnings(record=True)
            self._seen = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
