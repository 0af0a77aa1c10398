"""`python scripts/bench_clock_sync.py [--steps 2000]`: what sharing rank 0's clock costs per training step.

Under a seconds budget with DDP, charlm.training.budget.BudgetClock broadcasts rank 0's elapsed seconds once per
step (one float64). This starts two gloo processes on the CPU, as `trainer=ddp_cpu` does, and prints the
median microseconds of that broadcast (and of Lightning's own per-step broadcast of the Timer's stop flag,
a pickled object, for scale). Run it alone: on a busy machine the figure is noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, steps: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    t = torch.zeros(1, dtype=torch.float64)
    timings = {"float64 tensor (charlm's clock)": [], "pickled object (Lightning's Timer flag)": []}
    for _ in range(steps):
        dist.barrier()  # both ranks start each call together, as after a step's gradient all-reduce
        t0 = time.perf_counter()
        t.fill_(time.perf_counter())
        dist.broadcast(t, src=0)
        float(t.item())
        timings["float64 tensor (charlm's clock)"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dist.broadcast_object_list([False], src=0)
        timings["pickled object (Lightning's Timer flag)"].append(time.perf_counter() - t0)
    if rank == 0:
        out.update({k: statistics.median(v) * 1e6 for k, v in timings.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--port", type=int, default=29517)
    args = parser.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args.steps, args.port, out), nprocs=2)
        for name, us in out.items():
            print(f"{name}: {us:.1f} us per step (median of {args.steps}, 2 gloo processes)")


if __name__ == "__main__":
    main()
