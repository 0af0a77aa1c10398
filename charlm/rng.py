"""RNG states as tensors and plain data (checkpoints load with `weights_only=True`): exact resume."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and plain data."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


class StepDraws:
    """Draws that are true with probability `p`, a function of (seed, step) alone: a resumed run draws what the
    uninterrupted run drew, and every DDP rank the same. Made `block` steps at a time: a step costs one lookup."""

    def __init__(self, p: float, seed: int = 0, block: int = 1024):
        self.p, self.seed, self.block = p, seed, block
        self._at, self._draws = -1, []

    def __call__(self, step: int) -> bool:
        if not self.p:
            return False
        at, i = divmod(step, self.block)
        if at != self._at:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + at) % 2**63)
            self._at, self._draws = at, (torch.rand(self.block, generator=g, dtype=torch.float64) < self.p).tolist()
        return self._draws[i]
