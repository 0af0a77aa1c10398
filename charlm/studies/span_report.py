"""The memory-span study's side of REPORT.md: the classic claims and a verdict on each, the tables, and
the figures (accuracy against lag with seeds as bands and the truncated-BPTT runs beside it; gate
openings over training next to the lag-gradient curves). Reads only the study's JSON-able results."""

from __future__ import annotations

import math
from pathlib import Path

LOW = 0.5  # spans are measured at `span_threshold` (conf/report.yaml, 0.9) and at this accuracy
# The classic claims, by model name: a span in characters, ">=N", or "window" (= the model's context).
CLAIMS = {
    "rnn": ("~7 steps (CS224N lecture 6)", 7),
    "lstm": ("~100 steps (CS224N lecture 6)", 100),
    "gru": ("gated like the LSTM (~100), with a less stable gradient (Su Jianlin)", 100),
    "transformer": ("its window: all of it, nothing beyond", "window"),
    **{m: ("512+: the gradient through time is a product of gates kept near 1", ">=512")
       for m in ("mingru", "minlstm", "hawk", "mamba")},
    "slstm": ("at least the LSTM's ~100: exponential input gates revise what is stored rather than shorten "
              "memory (Beck et al. 2024)", ">=100"),
    **{m: ("512+: a matrix memory behind forget gates started near 1, no memory mixing (Beck et al. 2024)", ">=512")
       for m in ("mlstm", "xlstm")},
}


def _fmt(s) -> str:
    return "none" if s is None else str(s)


def spans(d: dict, task: dict) -> tuple:
    """(span at span_threshold, span at LOW) of a {threshold: span} dict."""
    return tuple(d[str(t)] for t in task["thresholds"])


def _window_verdict(text: str, r: dict, task: dict, s50) -> tuple[str, str]:
    W, lags = r["window"], r["lags"]
    inside = [a for lag, a in zip(lags, r["accuracy"]) if W is not None and lag + 2 <= W]  # s still in the window
    beyond = [a for lag, a in zip(lags, r["accuracy"]) if W is not None and lag + 2 > W]
    if not beyond:
        return text, f"untested: no window, or no ladder lag beyond it (window {W})."
    at_chance = max(beyond) <= task["chance"] + 0.1
    last_inside = max((lag for lag in lags if lag + 2 <= W), default=0)
    if at_chance and s50 is not None and s50 >= last_inside:
        return text, (f"agrees: accuracy >= {LOW} at every lag inside its window of {W} (lowest {min(inside):.2f}) "
                      f"and at most {max(beyond):.2f} beyond it (chance {task['chance']:.2f}): the cutoff is the "
                      f"window's, not a fading memory.")
    if at_chance:
        learned = (f"recalls only up to lag {s50} inside it" if s50 is not None else
                   f"did not learn the task (at most {max(inside, default=0):.2f} inside it)")
        return text, (f"disagrees in part: the cutoff at its window ({W}) holds (at most {max(beyond):.2f} beyond), "
                      f"but in {task['steps']} steps it {learned}.")
    return text, f"disagrees: {max(beyond):.2f} beyond its window of {W} is above chance, so the probe leaks."


def verdict(name: str, r: dict, task: dict, results: dict) -> tuple[str, str]:
    """(claim, one sentence: agrees or disagrees, and why) for model `name`'s entry r."""
    if name not in CLAIMS:
        return "no classic claim", "nothing to compare; measured for the record."
    text, claim = CLAIMS[name]
    lags, (s90, s50) = r["lags"], spans(r["span"], task)
    if claim == "window":
        return _window_verdict(text, r, task, s50)
    longest = s50 is not None and s50 == lags[-1]
    block, steps, params = r["block_size"], task["steps"], r["params"]
    if s50 is None:
        return text, (f"disagrees: accuracy is under {LOW} already at lag {lags[0]}, so in {steps} steps these "
                      f"{params:,} parameters did not learn the task; nothing is measured.")
    target, measured = int(str(claim).lstrip(">=")), -1 if s50 is None else s50
    if str(claim).startswith(">="):
        if measured >= target:
            return text, ("agrees: " + ("it held S at every lag of the ladder" if longest else
                                        f"accuracy stays >= {LOW} up to lag {s50}") + ".")
        return text, (f"disagrees: accuracy fell below {LOW} after lag {_fmt(s50)} ({params:,} parameters, {steps} "
                      f"steps, truncated BPTT over {block} characters).")
    if target / 3 <= measured <= 3 * target:
        out = f"agrees: span {_fmt(s50)} (at {task['thresholds'][0]}: {_fmt(s90)}) is within a factor 3 of {target}"
    elif measured < target / 3:
        cause = (f"its gradient reached {block} characters back, so this is what {params:,} parameters learned in "
                 f"{steps} steps" if measured < block else
                 f"beyond the truncated-BPTT length {block} no gradient crossed and the state held S untrained")
        out = f"disagrees (shorter): span {_fmt(s50)} is under {target}/3; {cause}"
    else:
        out = (f"disagrees (longer): span {'>= ' if longest else ''}{s50} is over 3 x {target}; on a task that asks "
               f"for one symbol kept through noise, trained short to long, its gates learned to hold it (the claim "
               f"describes language models on text)")
    if name != "lstm" and "lstm" in results and claim == 100:  # "like the LSTM, less stable": seed spreads
        spread = {m: sorted(spans(d, task)[1] or 0 for d in results[m]["span_by_seed"].values())
                  for m in (name, "lstm")}
        out += (f"; spans over seeds {spread[name][0]}..{spread[name][-1]} against the LSTM's "
                f"{spread['lstm'][0]}..{spread['lstm'][-1]}")
    return text, out + "."


def _design(task: dict) -> str:
    return (
        f"`data=recall` (charlm/recall.py): a continuous stream of {task['n_fillers']} fillers with distractor "
        f"symbols among them (p = {task['p_distract']}), into which episodes `s<lag noise>?S` fall at random offsets "
        f"(gaps 0..{task['max_gap']}): the store token s (the lowercase twin of S) asks to remember S, the cue `?` "
        f"asks for it back. The position of s in a window carries no information, a window holds several episodes, "
        f"and the distractors are the answer symbols themselves. **Design: a curriculum, one run per model and "
        f"seed.** Lags are log-uniform in {task['min_lag']}..cap; the cap grows geometrically from "
        f"{task['curriculum_start']} to {task['max_lag']}, and distractors ramp in from none, over the first "
        f"{task['curriculum_steps']} of {task['steps']} steps: every model first learns the task at lags it can bridge "
        f"(short lags stay in every batch), then meets the long ones; one run per lag bucket would cost one run per "
        f"bucket. Small models on purpose, for the CPU budget (sizes {task['model_sizes']}, per model "
        f"{task['model_by_name']}, lr {task['lr']}); {len(task['seeds'])} seeds (lines: mean, bands: min..max). Each "
        f"run goes through the builder with the model's own sampling (recurrent: streams with the state carried, "
        f"truncated BPTT over data.block_size = {task['block_size']}; transformer: random windows of "
        f"{task['block_size']}, its context). Probe (charlm/probe.py): {task['n_eval']} rows per lag, each "
        f"{task['prefix']} characters of stream, then s, `lag` noise characters and `?`, scored at the cue among the "
        f"{task['n_symbols']} symbols (chance {task['chance']:.3f}); a windowed model sees its last `window` "
        f"characters, so s is in view up to lag window - 2. Span at {task['thresholds'][0]} / {LOW}: the longest "
        f"ladder lag up to which the mean accuracy stays at or above it.")


def markdown(span: dict) -> list[str]:
    """REPORT.md's memory-span and gates sections."""
    task, results = span["task"], span["models"]
    lags, (hi, lo) = task["lags"], task["thresholds"]
    md = ["## Memory span", "", _design(task), "", "![memory span](memory_span.png)", "",
          f"| model | claim | span {hi} | span {lo} | by seed ({hi}/{lo}) | verdict |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        claim, sentence = verdict(name, r, task, results)
        seeds = ", ".join("/".join(map(_fmt, spans(d, task))) for d in r["span_by_seed"].values())
        measured = " | ".join(map(_fmt, spans(r["span"], task)))
        md.append(f"| {name} | {claim} | {measured} | {seeds} | {sentence} |")
    row = lambda r: " | ".join(f"{a:.2f}" for a in r["accuracy"]) + " |"  # noqa: E731
    md += ["", "Mean accuracy by lag:", "", "| model | params | window | " + " | ".join(map(str, lags)) + " |",
           "|---|---|---|" + "---|" * len(lags)]
    md += [f"| {name} | {r['params']:,} | {_fmt(r['window'])} | " + row(r) for name, r in results.items()]
    if span.get("tbptt"):
        tb = span["tbptt"]
        md += ["", f"**Truncated BPTT.** The same {tb['model']} trained with data.block_size "
               f"{', '.join(tb['runs'])} (the batch size scaled so that every step sees the same characters): the "
               "state crosses chunk boundaries, the gradient never does.", "",
               f"| data.block_size | batch | span {hi} | span {lo} | " + " | ".join(map(str, lags)) + " |",
               "|---|---|---|---|" + "---|" * len(lags)]
        md += [f"| {b} | {r['batch_size']} | " + " | ".join(map(_fmt, spans(r["span"], task))) + " | " + row(r)
               for b, r in tb["runs"].items()]
    return md + _gates_markdown(span["gates"])


def _gates_markdown(gates: dict) -> list[str]:
    with_hook = [m for m, g in gates.items() if any(len(h) > 1 for h in g["history"])]  # more than "step"
    without = [m for m in gates if m not in with_hook]
    md = ["", "## Gates", "",
          "Left: the mean memory-gate opening per layer (1 keeps the past), logged as `gates/...` at every validation "
          "while training on `data=recall` (first seed), through the model contract's `gate_openings` hook "
          f"({', '.join(with_hook) or 'no model'}; none from {', '.join(without) or 'no model'}). Right: the "
          "lag-gradient curves of the same trained models, the gradient norm of the loss at a cue with respect to "
          "the embedding k characters earlier (a windowed model: within its window).", "", "![gates](gates.png)", ""]
    for name, g in gates.items():
        c = g.get("forget_claim")
        if not c or not c["grad"]:
            continue
        rate = abs(math.log(c["grad_decay"]) - math.log(c["forget_decay"])) <= 0.5 * abs(math.log(c["forget_decay"]))
        ok = c["r"] >= 0.9 and rate
        md.append(f"**Does the {name}'s gradient through time follow its forget gate?** Over lags 1.."
                  f"{len(c['lags']) - 1} of the trained model, the gradient norm at the cue and the mean product of "
                  f"the forget gates along the cell path (both relative to lag 1, dashed in the figure) have "
                  f"log-correlation r = {c['r']:.3f}; per character the gradient shrinks by x{c['grad_decay']:.4f} and "
                  f"the forget-gate product by x{c['forget_decay']:.4f}. "
                  + ("Agrees: the forget gate sets the rate." if ok else
                     "Disagrees: the gradient's decay is not the forget gate's alone (the h path, the input and "
                     "output gates weigh in)."))
    return md


# ---- figures --------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, lags, r: dict, color: str, label: str, marker: str = "o") -> None:
    """Mean accuracy as a line, min..max over seeds as a band."""
    by_seed = list(r["accuracy_by_seed"].values())
    ax.fill_between(lags, [min(s[i] for s in by_seed) for i in range(len(lags))],
                    [max(s[i] for s in by_seed) for i in range(len(lags))], color=color, alpha=0.18, lw=0)
    ax.plot(lags, r["accuracy"], marker + "-", ms=4, lw=1.6, color=color, label=label)


def _axes(ax, task: dict, title: str) -> None:
    ax.axhline(task["chance"], color="gray", ls=":", lw=0.8, label="chance")
    for t in task["thresholds"]:
        ax.axhline(t, color="gray", ls="--", lw=0.6)
    ax.set_xscale("symlog", linthresh=1)
    ax.set(xlabel="lag (characters between the store token and the cue)", ylabel="recall accuracy",
           ylim=(0, 1.03), xlim=(-0.2, max(task["lags"]) * 1.2), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def plot_spans(span: dict, path: Path) -> None:
    """memory_span.png: every model (left), the truncated-BPTT runs of one model (right, when present)."""
    plt = _plt()
    task, lags, tb = span["task"], span["task"]["lags"], span.get("tbptt")
    label = lambda r: "/".join(str(r["span"][str(t)]) for t in task["thresholds"])  # noqa: E731
    fig, axes = plt.subplots(1, 2 if tb else 1, figsize=(13 if tb else 7.5, 4.8), squeeze=False)
    ax = axes[0, 0]
    for i, (name, r) in enumerate(span["models"].items()):
        _band(ax, lags, r, f"C{i % 10}", f"{name} (span {label(r)})", "osD^v<>px*"[i % 10])
        if r["window"] is not None:
            ax.axvline(r["window"], color=f"C{i % 10}", ls="-.", lw=1, label=f"{name} window {r['window']}")
    _axes(ax, task, f"Recall accuracy by lag ({task['steps']} steps, {len(task['seeds'])} seeds; "
          f"span {'/'.join(map(str, task['thresholds']))})")
    if tb:
        ax = axes[0, 1]
        for i, (block, r) in enumerate(tb["runs"].items()):
            _band(ax, lags, r, f"C{i}", f"block_size {block}, batch {r['batch_size']} (span {label(r)})")
            ax.axvline(int(block), color=f"C{i}", ls=":", lw=1)
        _axes(ax, task, f"{tb['model']}: truncated-BPTT length (dotted: data.block_size)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gates(gates: dict, path: Path) -> None:
    """gates.png: gate openings over training per model and layer (left), lag-gradient curves (right),
    with the LSTM forget-gate product along the same path (dashed, scaled to the gradient at lag 1)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (name, g) in enumerate(gates.items()):
        color = f"C{i % 10}"
        keys = sorted({k for h in g["history"] for k in h if k != "step"})
        for j, key in enumerate(keys):
            pts = [(h["step"], h[key]) for h in g["history"] if key in h]
            ax1.plot(*zip(*pts), "o" + ["-", "--", ":", "-."][j % 4], color=color, ms=3, lw=1.2, label=f"{name} {key}")
        ax2.plot([v if v > 0 and math.isfinite(v) else float("nan") for v in g["curve"]], color=color, lw=1.4,
                 label=name)
        c = g.get("forget_claim")
        if c and c["grad"]:
            ax2.plot(c["lags"], [v * g["curve"][1] for v in c["forget_product"]], "--", color=color, lw=1.2,
                     label=f"{name}: forget-gate product (r={c['r']:.2f})")
    ax1.set(xlabel="training step", ylabel="mean gate opening (1 = keep)", ylim=(0, 1.02),
            title="Memory-gate openings over training (gates/...)")
    if not any(len(h) > 1 for g in gates.values() for h in g["history"]):
        ax1.text(0.5, 0.5, "no model declares gate_openings", ha="center", va="center", transform=ax1.transAxes)
    ax2.set_yscale("log")
    ax2.set(xlabel="lag k (characters before the cue)", ylabel="mean ||dL_cue / d emb_(cue-k)||",
            title="Lag-gradient at the recall position (trained)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
