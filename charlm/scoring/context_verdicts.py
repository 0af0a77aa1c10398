"""Reading a context curve (charlm.studies.context measures it): the effective context, the plateau and the
cold-start gap, as numbers and as text, and the leaderboard's context column (`context_cell`).

- The effective context is the smallest k whose loss is at most 1% (relative) above the full-context loss
  and at most 2 paired standard errors above it; None ("not reached", "> 1024" in text) when no k is.
- The plateau is the smallest k whose loss is at most 1% above the loss at the largest k.
- The cold-start gap is the loss at the largest k against the full-context loss, in nats and %.

Pure functions of a curve ({k: loss}), the full-context loss and the paired SE per k: no model, no torch.
"""

from __future__ import annotations

import statistics

THRESHOLD = 0.01  # relative distance to the full-context loss that counts as "all the context it uses"
SE_FACTOR = 2.0  # ... and at most this many paired standard errors above it (a gap the positions' spread explains)
ROUNDING = 1e-6  # relative differences this small are float rounding (the two passes batch differently), not context


def effective_context(curve: dict[int, float], full: float, se: dict[int, float] | None = None,
                      threshold: float = THRESHOLD, se_factor: float = SE_FACTOR) -> int | None:
    """The smallest k whose loss is at most `threshold` (relative) above `full` and, given the paired
    standard errors `se`, at most `se_factor` of them above it; None when no k gets there (not reached).
    Without `se` (a curve recorded before they were) only the threshold counts."""
    for k in sorted(curve):
        diff = curve[k] - full
        close = diff <= threshold * full
        steady = se is None or diff <= se_factor * se[k] + ROUNDING * abs(full)
        if close and steady:
            return k
    return None


def plateau_context(curve: dict[int, float], threshold: float = THRESHOLD) -> int:
    """The smallest k whose loss is at most `threshold` (relative) above the loss at the largest k."""
    end = curve[max(curve)]
    return min(k for k, v in curve.items() if v <= end * (1 + threshold))


def cold_start_gap(curve: dict[int, float], full: float) -> tuple[float, float | None]:
    """(nats, %): how far the loss at the largest k stays above the full-context loss (% None when that is 0)."""
    end = curve[max(curve)]
    return end - full, 100 * (end / full - 1) if full > 0 else None


def gap_text(r: dict) -> str:
    """'+7.5% (+0.1470 nats)', or the nats alone when the full-context loss is 0."""
    pct, nats = r["cold_start_gap_pct"], r["cold_start_gap"]
    return f"{nats:+.4f} nats" if pct is None else f"{pct:+.1f}% ({nats:+.4f} nats)"


def describe(curve: dict[int, float], full: float, se: dict[int, float] | None = None) -> dict:
    """The verdicts on a curve: effective context (None: not reached), reached, plateau, cold-start gap."""
    k_eff = effective_context(curve, full, se)
    gap, pct = cold_start_gap(curve, full)
    return {"effective_context": k_eff, "reached": k_eff is not None, "plateau_context": plateau_context(curve),
            "cold_start_gap": gap, "cold_start_gap_pct": pct, "threshold": THRESHOLD, "se_factor": SE_FACTOR}


def effective_text(r: dict) -> str:
    """'91', or '> 1024' when no k reached the band."""
    k = r.get("effective_context")
    return f"> {max(int(g) for g in r['context_use'])}" if k is None else str(k)


def gap_meaning(r: dict) -> str:
    """One line on what the cold-start gap means for this curve."""
    last, p = max(int(k) for k in r["context_use"]), r["plateau_context"]
    if r.get("reached"):
        return "the band is reached: once enough characters are read, the empty start costs next to nothing."
    if r["cold_start_gap"] <= r["threshold"] * r["full_context_loss"]:
        return (f"within {r['threshold']:.0%} of full context but more than {r['se_factor']:g} paired SE above it at "
                "every k: a small, real gain from context beyond the grid.")
    if p < last:
        return (f"the curve is flat from k={p} on yet stays above full context: the gap is what reading from an "
                "empty state costs this model, not context it is missing.")
    return (f"the loss still falls at k={last}: the model may use more context than the grid measures, or still be "
            "recovering from its cold start.")


def verdicts(c: dict) -> dict | None:
    """A context.json's curve with its verdicts (`describe`), recomputed from the curve so a file written before
    the paired SE existed reads the same way (then only the 1% band counts); None without a curve."""
    if not (c.get("context_use") and c.get("full_context_loss")):
        return None
    curve = {int(k): float(v) for k, v in c["context_use"].items()}
    se = {int(k): float(v) for k, v in c["paired_se"].items()} if c.get("paired_se") else None
    return {"context_use": curve, "full_context_loss": c["full_context_loss"], "paired_se": se,
            **describe(curve, c["full_context_loss"], se), "positions": c.get("positions", 0), "grid": sorted(curve)}


def context_cell(records: list[dict]) -> str:
    """The leaderboard's effective-context cell from the seeds' context.json: the mean effective context when
    every measured seed reached it; else the plateau and the cold-start gap ('> 1,024 (plateau 16, gap +7.5%)'),
    or, when only some seeds reached it, their mean and how many did not. '' when none was measured."""
    measured = [v for v in map(verdicts, records) if v is not None]
    if not measured:
        return ""
    reached = [v["effective_context"] for v in measured if v["reached"]]
    if len(reached) == len(measured):
        return f"{statistics.fmean(reached):,.0f}"
    if reached:
        return f"{statistics.fmean(reached):,.0f} ({len(measured) - len(reached)} of {len(measured)} seeds not reached)"
    last = max(v["grid"][-1] for v in measured)
    plateau = statistics.fmean(v["plateau_context"] for v in measured)
    pcts = [v["cold_start_gap_pct"] for v in measured if v["cold_start_gap_pct"] is not None]
    gap = (f"{statistics.fmean(pcts):+.1f}%" if len(pcts) == len(measured)
           else f"{statistics.fmean(v['cold_start_gap'] for v in measured):+.4f} nats")
    return f"> {last:,} (plateau {plateau:,.0f}, gap {gap})"
