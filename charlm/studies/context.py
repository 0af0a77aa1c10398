"""The context a model actually uses on real text (Khandelwal et al. 2018, "Sharp Nearby, Fuzzy Far Away").

At a fixed, seeded sample of positions p of a split, the model predicts ids[p+1] having read only the
last k characters, ids[p-k+1 .. p] (k=1: the current character alone), for k on a grid of steps of
about sqrt(2) from 1 to 1024. A recurrent model starts from an empty state k characters back; a model
with a window (`capabilities(model).context_size`, the transformer) reads min(k, window). The curve is
compared with the full-context loss at the same positions: the yardstick's one-stream pass, state
carried from the split's first character (a windowed model: its sliding window).

- The effective context is the smallest k whose loss is at most 1% (relative) above the full-context
  loss and at most 2 paired standard errors above it (the SE of the per-position differences at that
  k: a gap the positions' spread cannot tell from none). When no k gets there, it is not reached:
  None in the JSON, "> 1024" in the text.
- The plateau is the smallest k whose loss is at most 1% above the loss at the largest k: the context
  the model uses when it reads from an empty state.
- The cold-start gap is the loss at the largest k against the full-context loss (nats and %): with a
  flat curve, what starting from an empty state costs, not context the model is missing.
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
from charlm.scoring.context_verdicts import SE_FACTOR, THRESHOLD, describe, effective_text, gap_meaning, gap_text
from charlm.yardstick import IGNORE, eval_dataset

GRID = [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724, 1024]  # ~sqrt(2) steps
CHUNK = 64  # characters a recurrent model reads per call of a long window, its state carried
BATCH = 64  # windows per forward call: 64 x 64 characters stay nearer the cache than 256 rows (minGRU ~15% faster)


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


def context_use(model, ids: torch.Tensor, n_positions: int = 2000, seed: int = 0, device: str = "cpu",
                grid: list[int] | None = None, min_offset: int = 1024, batch_size: int = BATCH,
                chunk: int = CHUNK) -> dict:
    """Loss against the characters read (k) at a seeded sample of positions with its paired standard error,
    the full-context loss at the same positions and the verdicts (`describe`, the module docstring). A
    model without a window reads long windows `chunk` characters at a time, its state carried. Leaves the
    model's mode as it was."""
    grid = sorted(GRID if grid is None else grid)
    if min_offset < grid[-1] - 1:
        raise ValueError(f"min_offset={min_offset}: positions must be at least {grid[-1] - 1} in for k={grid[-1]}")
    start, was_training = time.perf_counter(), model.training
    model = model.to(device).eval()
    try:
        positions = sample_positions(len(ids), n_positions, seed, min_offset)
        full_at = full_context_losses(model, ids, device)[positions]                       # (P,)
        window = capabilities(model).context_size
        by_length: dict[int, torch.Tensor] = {}  # characters read -> losses (k >= window all read the same)
        curve, se = {}, {}
        for k in grid:
            n = k if window is None else min(k, window)
            if n not in by_length:
                by_length[n] = truncated_losses(model, ids, positions, n, batch_size, device,
                                                chunk if window is None else None)  # (P,)
            diff = by_length[n] - full_at                                                  # (P,) paired
            curve[k] = float(by_length[n].mean())
            if len(diff) > 1:  # one position has no spread: then only the 1% band counts
                se[k] = float(diff.std() / math.sqrt(len(diff)))
    finally:
        model.train(was_training)
    full, se = float(full_at.mean()), se or None
    return {"context_use": curve, "paired_se": se, "full_context_loss": full, **describe(curve, full, se),
            "positions": len(positions), "grid": grid, "seconds": time.perf_counter() - start}


def summary(r: dict) -> list[str]:
    """Lines for a terminal: each grid point with its paired SE, the full-context loss, the verdicts."""
    full, se = r["full_context_loss"], r.get("paired_se") or {}
    lines = [f"  k={k:>5} chars read: {v:.4f} nats ({100 * (v / full - 1):+.1f}% vs full context"
             + (f", paired SE {se[k]:.4f})" if k in se else ")") for k, v in r["context_use"].items()]
    last = max(int(k) for k in r["context_use"])
    lines.append(f"full context (state carried from the split's start): {full:.4f} nats at "
                 f"{r['positions']:,} positions")
    rule = f"at most {r['threshold']:.0%} and {r['se_factor']:g} paired SE above the full-context loss"
    if r.get("reached"):
        lines.append(f"effective context: {r['effective_context']} chars (the smallest k {rule})")
    else:
        lines.append(f"effective context: not reached (> {last} chars): no k is {rule}")
    lines.append(f"plateau: {r['plateau_context']} chars (smallest k within {r['threshold']:.0%} of the loss at "
                 f"k={last}: the context used reading from an empty state)")
    lines.append(f"cold-start gap (the loss at k={last} against full context): {gap_text(r)}; {gap_meaning(r)}")
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
        if r.get("effective_context") is not None:
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
    if r.get("effective_context") is None:
        return (f"- {source}: not determined: the effective context was not reached ({effective_text(r)} chars; "
                f"the loss at the longest k stays {gap_text(r)} above full context, plateau at "
                f"{r['plateau_context']} chars), so there is no measurement to set against the claim.")
    chars = r["effective_context"]
    measured = chars / chars_per_word if unit == "words" else chars  # a step of a character model is a character
    shown = (f"{effective_text(r)} chars" + (f" (~{measured:.0f} words at {chars_per_word:.1f} chars/word)"
                                             if unit == "words" else ""))
    ratio = measured / claimed
    if 0.5 <= ratio <= 2:
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
             f"k at most {THRESHOLD:.0%} and {SE_FACTOR:g} paired SE above the full-context loss; not reached "
             "(> the grid) when no k is (docs/context.md).", "", "![context](context.png)", ""]
    for name, r in curves.items():
        reached = r.get("effective_context") is not None
        lines.append(f"- {name}: full context {r['full_context_loss']:.4f} nats, "
                     f"k=1 {r['context_use'][min(r['grid'])]:.4f}, "
                     + (f"effective context {effective_text(r)} chars" if reached else
                        f"effective context not reached ({effective_text(r)} chars; plateau {r['plateau_context']} "
                        f"chars, cold-start gap {gap_text(r)})")
                     + f" ({r['positions']:,} positions).")
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
