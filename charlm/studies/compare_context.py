"""The context measurements charlm.compare adds to a comparison: each measured run's effective context
(DIR/MODEL-SEED/context.json, a leaderboard column) and, at the end, DIR/context.png and DIR/context.md, the
curves against the published claims (charlm.studies.context). The leaderboard's column reads the same files
(charlm.scoring.context_verdicts.context_cell)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from charlm import cli
from charlm.atomic import write_json
from charlm.scoring.context_verdicts import verdicts
from charlm.scoring.leaderboard import read_json


def measure_context(folder: Path, train_cfg: DictConfig, positions: int) -> bool:
    """The best checkpoint's effective context on the val split (charlm.studies.context) into
    folder/context.json; False (and one line) if it cannot be measured."""
    try:
        from charlm.studies.context import context_use, effective_text
    except ImportError:
        print(f"charlm.compare: {folder.name}: no effective context (charlm.studies.context is not installed)")
        return False
    from charlm.checkpoint import load_model
    from charlm.training.build import build_data

    results = read_json(folder / "results.json")
    best = folder / "checkpoints" / Path(results.get("best_ckpt") or "last.ckpt").name  # the folder may have moved
    try:
        model, vocab, _ = load_model(best)
        ids = build_data(train_cfg, vocab).splits["val"]
        gpu = torch.cuda.is_available() and str(train_cfg.trainer.get("accelerator")) in ("gpu", "cuda", "auto")
        device = "cuda" if gpu else "cpu"
        t0 = time.perf_counter()
        use = context_use(model.to(device), ids, n_positions=positions, device=device)
        seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a failed measurement leaves the column empty, not the comparison
        print(f"error: {folder.name}: effective context: {cli.error_line(e)}", file=sys.stderr)
        return False
    keys = ("effective_context", "reached", "plateau_context", "cold_start_gap", "cold_start_gap_pct",
            "full_context_loss")
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in use.items() if k in keys}
    record.update(positions=positions, checkpoint=best.name, seconds=round(seconds, 3),
                  context_use=use.get("context_use"), paired_se=use.get("paired_se"),
                  chars_per_word=chars_per_word(ids, vocab))
    write_json(folder / "context.json", record)
    print(f"charlm.compare: {folder.name}: effective context {effective_text(use)} chars "
          f"({positions} positions, {seconds:.1f} s)")
    return True


def chars_per_word(ids: torch.Tensor, vocab) -> float:
    """Characters per whitespace-separated word of a split: turns the claims made in words into characters."""
    text = vocab.decode(ids.tolist())
    return len(text) / max(1, len(text.split()))


def context_report(out: Path, models: list[str], seeds: list[int]) -> bool:
    """DIR/context.png and DIR/context.md: each model's context curve (the first seed that has one) and a line
    per published claim, agrees or not and why (charlm.studies.context). False when no run measured one."""
    from charlm.atomic import write_atomic
    from charlm.studies.context import markdown, plot_context

    curves, per_word = {}, None
    for m in models:
        for s in seeds:
            c = read_json(out / f"{m}-{s}" / "context.json")
            if (v := verdicts(c)) is None:
                continue
            curves[m] = v
            per_word = per_word or c.get("chars_per_word")
            break
    if not curves:
        return False
    plot_context(curves, out / "context.png")
    lines = markdown(curves, per_word or 5.5)  # 5.5: English text's characters per word, when none was recorded
    write_atomic(out / "context.md", "\n".join(lines) + "\n")
    return True
