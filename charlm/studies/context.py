"""The context a model actually uses on real text (Khandelwal et al. 2018, "Sharp Nearby, Fuzzy Far Away").

At a fixed, seeded sample of positions p of a split, the model predicts ids[p+1] having read only the
last k characters, ids[p-k+1 .. p] (k=1: the current character alone), for k on a grid of steps of
about sqrt(2) from 1 to 1024. A recurrent model starts from an empty state k characters back; a model
with a window (`capabilities(model).context_size`, the transformer) reads min(k, window). The curve is
compared with the full-context loss at the same positions: the yardstick's one-stream pass, state
carried from the split's first character (a windowed model: its sliding window). The effective
context is the smallest k whose loss is within 1% (relative) of that full-context loss.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from charlm.errors import CorpusError
from charlm.models.contract import capabilities
from charlm.schemas import EvalConfig
from charlm.yardstick import IGNORE, eval_dataset

GRID = [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724, 1024]  # ~sqrt(2) steps
CHUNK = 64  # characters a recurrent model reads per call of a long window, its state carried
BATCH = 64  # windows per forward call: 64 x 64 characters stay nearer the cache than 256 rows (minGRU ~15% faster)
THRESHOLD = 0.01  # relative distance to the full-context loss that counts as "all the context it uses"


def sample_positions(n: int, n_positions: int, seed: int, min_offset: int) -> torch.Tensor:
    """`n_positions` distinct positions p of a split of n characters, min_offset <= p <= n - 2 (ids[p+1]
    exists), drawn with `seed`, sorted. Too short a split is a CorpusError naming the sizes."""
    available = n - 1 - min_offset
    if available < n_positions:
        raise CorpusError(f"the split has {n:,} characters: measuring context at {n_positions:,} positions, each "
                          f"at least {min_offset:,} characters in, needs at least {min_offset + n_positions + 1:,}")
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(available, generator=g)[:n_positions] + min_offset).sort().values  # (P,)


@torch.no_grad()
def full_context_losses(model, ids: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """Per-position loss (nats) of the yardstick pass with one stream: entry p is the loss of predicting
    ids[p+1] with the state carried from ids[0] (a windowed model: the sliding window). Shape (n - 1,)."""
    e = EvalConfig()
    context = capabilities(model).context_size
    data = eval_dataset(ids, context, 1, e.chunk, e.stride, e.batch_size)
    where = eval_dataset(torch.arange(len(ids)), context, 1, e.chunk, e.stride, e.batch_size)  # same cut, of positions
    losses = torch.full((len(ids) - 1,), math.nan, dtype=torch.float64)
    state = None
    for (x, y, reset), (_, target_pos, _) in zip(data, where):
        logits, state = model(x.to(device), None if reset else state)              # (B, T, V)
        scored = target_pos != IGNORE                                              # (B, T)
        nats = F.cross_entropy(logits.float()[scored.to(device)], y.to(device)[scored.to(device)],
                               reduction="none")                                    # (scored,)
        losses[target_pos[scored] - 1] = nats.double().cpu()
    return losses


@torch.no_grad()
def truncated_losses(model, ids: torch.Tensor, positions: torch.Tensor, k: int, batch_size: int,
                     device: str = "cpu", chunk: int | None = None) -> torch.Tensor:
    """Loss (nats) at each position p of predicting ids[p+1] from ids[p-k+1 .. p] alone, from an empty
    state: the windows of all positions, batch_size rows per forward call. With `chunk`, a recurrent
    model reads each window `chunk` characters at a time, its state carried (the same recurrence, in
    pieces that stay in the CPU's cache: 2.5x faster for minGRU at k=1024). Shape (P,)."""
    rows = positions[:, None] + torch.arange(-k + 1, 1)                           # (P, k) indices into ids
    step = chunk or k
    out = []
    for a in range(0, len(positions), batch_size):
        x = ids[rows[a : a + batch_size]].long().to(device)                        # (b, k)
        y = ids[positions[a : a + batch_size] + 1].long().to(device)               # (b,)
        state = None
        for s in range(0, k, step):
            logits, state = model(x[:, s : s + step], state)                       # (b, <=step, V)
        out.append(F.cross_entropy(logits[:, -1].float(), y, reduction="none").double().cpu())  # (b,)
    return torch.cat(out)


def effective_context(curve: dict[int, float], full: float, threshold: float = THRESHOLD) -> tuple[int, bool]:
    """(the smallest k whose loss is within `threshold` (relative) of `full`, False), or (the largest k,
    True) when no grid point gets there."""
    for k in sorted(curve):
        if curve[k] <= full * (1 + threshold):
            return k, False
    return max(curve), True


def context_use(model, ids: torch.Tensor, n_positions: int = 2000, seed: int = 0, device: str = "cpu",
                grid: list[int] | None = None, min_offset: int = 1024, batch_size: int = BATCH,
                chunk: int = CHUNK) -> dict:
    """Loss against the characters read (k) at a seeded sample of positions, the full-context loss at the
    same positions and the effective context (see the module docstring). A model without a window reads
    long windows `chunk` characters at a time, its state carried. Leaves the model's mode as it was."""
    grid = sorted(GRID if grid is None else grid)
    if min_offset < grid[-1] - 1:
        raise ValueError(f"min_offset={min_offset}: positions must be at least {grid[-1] - 1} in for k={grid[-1]}")
    start, was_training = time.perf_counter(), model.training
    model = model.to(device).eval()
    try:
        positions = sample_positions(len(ids), n_positions, seed, min_offset)
        full = float(full_context_losses(model, ids, device)[positions].mean())
        window = capabilities(model).context_size
        by_length: dict[int, float] = {}  # characters read -> loss (k >= window all read the same windows)
        curve = {}
        for k in grid:
            n = k if window is None else min(k, window)
            if n not in by_length:
                by_length[n] = float(truncated_losses(model, ids, positions, n, batch_size, device,
                                                      chunk if window is None else None).mean())
            curve[k] = by_length[n]
    finally:
        model.train(was_training)
    k_eff, above = effective_context(curve, full)
    return {"context_use": curve, "full_context_loss": full, "effective_context": k_eff, "above_grid": above,
            "threshold": THRESHOLD, "positions": len(positions), "grid": grid,
            "seconds": time.perf_counter() - start}


def effective_text(r: dict) -> str:
    """'91' or 'above 1024' (no grid point came within the threshold)."""
    return f"above {r['effective_context']}" if r.get("above_grid") else str(r["effective_context"])


def summary(r: dict) -> list[str]:
    """Lines for a terminal: each grid point, the full-context loss, the effective context."""
    full = r["full_context_loss"]
    lines = [f"  k={k:>5} chars read: {v:.4f} nats ({100 * (v / full - 1):+.1f}% vs full context)"
             for k, v in r["context_use"].items()]
    lines.append(f"full context (state carried from the split's start): {full:.4f} nats at "
                 f"{r['positions']:,} positions")
    lines.append(f"effective context: {effective_text(r)} chars (smallest k within {r['threshold']:.0%} "
                 "of the full-context loss)")
    return lines


def plot_context(curves: dict[str, dict], path) -> None:
    """Loss against characters read, one curve per model (log x), each model's full-context loss dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, r) in enumerate(curves.items()):
        color = f"C{i}"
        ks = [int(k) for k in r["context_use"]]
        ax.plot(ks, list(r["context_use"].values()), "o-", ms=3, color=color,
                label=f"{name} (effective {effective_text(r)})")
        ax.axhline(r["full_context_loss"], ls="--", lw=1, color=color)
        ax.axvline(r["effective_context"], ls=":", lw=0.8, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("characters read before predicting (k)")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title("Context used on real text (dashed: full context)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Published claims the report checks: (source, family, claimed context, its unit).
CLAIMS = [
    ("CS224N: \"an LSTM keeps about 100 steps\"", "lstm", 100, "steps"),
    ("CS224N: \"a vanilla RNN about 7\"", "rnn", 7, "steps"),
    ("Khandelwal et al. 2018: LSTM language models use \"about 200 tokens\"", "lstm", 200, "words"),
]


def claim_line(source: str, r: dict | None, claimed: float, unit: str, chars_per_word: float) -> str:
    """One markdown line: the measured effective context against a claim, agrees (within a factor of 2)
    or not, and why."""
    if r is None:
        return f"- {source}: no checkpoint of that family in this report."
    chars = r["effective_context"]
    measured = chars / chars_per_word if unit == "words" else chars  # a step of a character model is a character
    shown = (f"{effective_text(r)} chars" + (f" (~{measured:.0f} words at {chars_per_word:.1f} chars/word)"
                                             if unit == "words" else ""))
    ratio = measured / claimed
    if r.get("above_grid"):
        verdict, why = ("disagrees" if measured > 2 * claimed else "cannot tell",
                        "the loss still falls at the longest context measured, so the model uses more than that")
    elif 0.5 <= ratio <= 2:
        verdict, why = "agrees", f"within a factor of 2 of {claimed} {unit}"
    elif ratio < 0.5:
        verdict, why = "disagrees (shorter)", ("a small model trained briefly has not learned to use far context; "
                                               "the claim is about models trained to convergence on large corpora")
    else:
        verdict, why = "disagrees (longer)", (f"a {unit[:-1]} of the claim covers less text than this model reads: "
                                              "character models need several steps per word, and the 1% "
                                              "threshold also counts the small gains from far context")
    return f"- {source}: measured {shown} within {r['threshold']:.0%} of full context: {verdict}; {why}."


def markdown(curves: dict[str, dict], chars_per_word: float) -> list[str]:
    """The report's paragraph: the figure, one line per model, one line per claim."""
    lines = ["## Context used on real text", "",
             "Loss when the model reads only the last k characters before each scored position (dashed: the "
             "same positions with the state carried from the split's start). Effective context: the smallest "
             f"k within {THRESHOLD:.0%} of the full-context loss (docs/context.md).", "", "![context](context.png)", ""]
    for name, r in curves.items():
        lines.append(f"- {name}: full context {r['full_context_loss']:.4f} nats, "
                     f"k=1 {r['context_use'][min(r['grid'])]:.4f}, "
                     f"effective context {effective_text(r)} chars ({r['positions']:,} positions).")
    lines.append("")
    lines += [claim_line(src, curves.get(family), claimed, unit, chars_per_word)
              for src, family, claimed, unit in CLAIMS]
    return lines


def context_study(checkpoints: dict[str, str | Path], ids: torch.Tensor, out_dir, n_positions: int = 2000,
                  device: str = "cpu", **kwargs) -> dict:
    """Measure every checkpoint's context use on `ids` (one split) and write OUT_DIR/context.json,
    context.png and context.md (the paragraph with the claims). kwargs go to `context_use`."""
    from charlm.atomic import write_atomic, write_json
    from charlm.checkpoint import load_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves, text = {}, ""
    for name, path in checkpoints.items():
        model, vocab, _ = load_model(path)
        text = text or vocab.decode(ids.tolist())
        curves[name] = context_use(model, ids, n_positions=n_positions, device=device, **kwargs)
    chars_per_word = len(text) / max(1, len(text.split()))
    lines = markdown(curves, chars_per_word)
    write_json(out_dir / "context.json", {"curves": curves, "chars_per_word": chars_per_word})
    plot_context(curves, out_dir / "context.png")
    write_atomic(out_dir / "context.md", "\n".join(lines) + "\n")
    return {"curves": curves, "chars_per_word": chars_per_word, "markdown": lines}
