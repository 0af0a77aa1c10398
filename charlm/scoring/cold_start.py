"""The cold-start loss: how well a model reads text from an empty state.

The yardstick starts each stream cold once and carries the state from there, so it scores a recurrent
model almost entirely warm; a model trained on streams (state carried) almost never meets an empty state
in training either. Sampling, `charlm.explain` and every window of `charlm.evaluate context=true` start
cold. This figure measures that start: at `positions` seeded offsets s of a split, the model reads
ids[s .. s+chars-1] from an empty state and predicts ids[s+1 .. s+chars]; the cold-start loss is the mean
over all those characters (nats). A model with a window shorter than `chars` reads its window.

The offsets depend only on the split's length and the seed (the defaults: 64 offsets, 32 characters,
seed 0), so two models scored on the same split are scored at the same places, and the per-offset losses
pair up (`paired_difference`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from charlm.models.contract import capabilities

CHARS = 32  # characters scored after each cold start
POSITIONS = 64  # seeded cold starts per split
SEED = 0  # fixed, not the run's seed: every run on a split is scored at the same offsets


def cold_starts(n: int, positions: int = POSITIONS, chars: int = CHARS, seed: int = SEED) -> torch.Tensor:
    """Sorted distinct offsets s with s + chars < n (so ids[s+chars] exists), at most `positions` of them,
    drawn with `seed`. Shape (P,); empty when the split is shorter than chars + 1."""
    available = max(0, n - chars)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=g)[: min(positions, available)].sort().values  # (P,)


@torch.no_grad()
def cold_start_losses(model: torch.nn.Module, ids: torch.Tensor, positions: int = POSITIONS, chars: int = CHARS,
                      seed: int = SEED, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each cold start's mean loss (nats) over its first `chars` characters, in offset order. Shape (P,).
    The model's mode is left as it was."""
    window = capabilities(model).context_size
    chars = min(chars, window) if window else chars
    starts = cold_starts(len(ids), positions, chars, seed)
    rows = starts[:, None] + torch.arange(chars + 1)                            # (P, chars+1) indices into ids
    w = ids[rows].long().to(device)                                             # (P, chars+1)
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(w[:, :-1])                                            # (P, chars, V), from an empty state
    finally:
        model.train(was_training)
    nats = F.cross_entropy(logits.float().transpose(1, 2), w[:, 1:], reduction="none")  # (P, chars)
    return nats.double().mean(1).cpu()                                          # (P,)


def cold_start_loss(model: torch.nn.Module, ids: torch.Tensor, positions: int = POSITIONS, chars: int = CHARS,
                    seed: int = SEED, device: torch.device | str = "cpu") -> dict:
    """The cold-start loss of `model` on `ids` (one split), its standard error over the offsets, and how it
    was measured (`protocol`); loss None when the split is too short for one cold start."""
    losses = cold_start_losses(model, ids, positions, chars, seed, device)
    window = capabilities(model).context_size
    read = min(chars, window) if window else chars
    n = len(losses)
    loss = float(losses.mean()) if n else None
    se = float(losses.std() / math.sqrt(n)) if n > 1 else None
    return {"loss": loss, "se": se, "losses": losses.tolist(),
            "protocol": {"positions": n, "chars": read, "seed": seed,
                         "text": f"first {read} chars from an empty state at {n} seeded offsets, seed {seed}"}}


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean, standard error) of a - b over cold starts scored at the same offsets (the same split and
    protocol). A difference beyond about 2 SE is more than the offsets' spread explains (normal
    approximation: at 64 offsets Student's t needs 2.00)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired cold starts need the same offsets, at least 2: got {len(a)} and {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def cold_start_line(loss: float | None, protocol: dict | None) -> str | None:
    """'cold start: 2.3456 nats (first 32 chars from an empty state at 64 seeded offsets, seed 0)', or
    None when there is no figure."""
    if loss is None or not protocol:
        return None
    return f"cold start: {loss:.4f} nats ({protocol['text']})"
