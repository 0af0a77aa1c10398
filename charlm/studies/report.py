"""`python -m charlm.report [size=tiny|cpu|gpu] [out_dir=reports]`: vanishing and exploding gradients, measured.

Writes OUT_DIR/gradient_flow.png/json (charlm.studies.gradflow), clipping.png/json (experiment=clip_off vs
clip_on, per-step loss and pre-clip gradient norm), memory_span.png/json (recall accuracy vs lag for
each model trained on data=recall, over seeds, and the truncated-BPTT runs), gates.png/json (gate
openings over training, lag-gradient curves, the forget-gate claim; charlm.studies.span_study), units.png/json
(the default LSTM's and GRU's units that track quotes, the column, speaker names; charlm.studies.units) and REPORT.md,
which shows the figures and the numbers. Models: `models` in conf/report.yaml, those with a
conf/model/NAME.yaml. Sizes come from `presets.SIZE` (`cpu`: 9-13 min on a quiet 2-core CPU;
`tiny`: ~15 s).
"""

from __future__ import annotations

import logging
import math
import platform
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from charlm.atomic import write_atomic, write_json
from charlm.cli import CONF_DIR, compose, hydra_main
from charlm.config import check_sections
from charlm.errors import ConfigError, DivergenceError
from charlm.schemas import ReportTop
from charlm.studies.quickfit import fit
from charlm.studies.span_report import markdown
from charlm.studies.span_study import available, finite, memory_span_study


class StepRecorder(L.Callback):
    """Per training step: the loss and the global gradient norm before clipping."""

    def __init__(self):
        self.loss: list[float] = []
        self.grad_norm: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # runs before CharLM clips
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norm.append(float(torch.nn.utils.get_total_norm(grads)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss.append(float(loss))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- the three studies ----------------------------------------------------------------------


def gradient_flow_study(cfg: DictConfig, preset: DictConfig, out: Path, models: list[str]) -> dict:
    """conf/gradflow.yaml's defaults with the preset's `gradflow` section, written by charlm.studies.gradflow."""
    from charlm.studies import gradflow

    gf = OmegaConf.load(Path(CONF_DIR) / "gradflow.yaml")
    gf = OmegaConf.masked_copy(gf, [k for k in gf if k not in ("defaults", "hydra")])
    gf = OmegaConf.merge(gf, preset.gradflow, {"models": models, "device": cfg.device, "seed": cfg.seed})
    curves = gradflow.measure(gf)
    gradflow.write(curves, out, f"Gradient flow, seq_len {gf.seq_len}, init (dashed) vs {gf.steps} steps (solid)")
    return {"seq_len": gf.seq_len, "steps": gf.steps, "curves": curves}


def clipping_study(cfg: DictConfig, preset: DictConfig, out: Path) -> dict:
    """experiment=clip_off and clip_on; the unclipped run's DivergenceError ends its curve."""
    runs = {}
    for name in ("clip_off", "clip_on"):
        rec = StepRecorder()
        overrides = [f"experiment={name}", f"trainer.max_steps={preset.clip.max_steps}",
                     f"trainer.val_check_interval={preset.clip.max_steps}"]
        error = None
        try:
            fit(overrides, {}, cfg.device, [rec], cfg.seed)
        except DivergenceError as e:  # the message names the step; the loss or gradient was NaN/inf
            error = "diverged at step " + (re.findall(r"step (\d+)", str(e)) or ["?"])[0]
        clip_value = float(compose("train", [f"experiment={name}"]).clip.value)
        runs[name] = {"loss": rec.loss, "grad_norm": rec.grad_norm, "clip": clip_value, "diverged": error}
        print(f"report: {name}: {len(rec.loss)} steps, loss {rec.loss[0]:.2f} -> {rec.loss[-1]:.3g}"
              + (f" ({error})" if error else ""))
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, r) in enumerate(runs.items()):
        steps = range(1, len(r["loss"]) + 1)
        loss = [v if math.isfinite(v) else float("nan") for v in r["loss"]]
        label = f"{name} (clip {r['clip']:g})" if r["clip"] else f"{name} (no clipping)"
        ax1.plot(steps, loss, color=f"C{i}", label=label)
        ax2.plot(range(1, len(r["grad_norm"]) + 1), r["grad_norm"], color=f"C{i}", label=label)
        if r["diverged"]:
            ax1.axvline(len(r["loss"]), color=f"C{i}", ls=":", label=f"{name}: {r['diverged']}")
        if r["clip"]:
            ax2.axhline(r["clip"], color=f"C{i}", ls="--", lw=0.8, label=f"clip threshold {r['clip']:g}")
    ax1.set(yscale="log", xlabel="step", ylabel="train loss (nats)", title="Loss with and without clipping")
    ax2.set(yscale="log", xlabel="step", ylabel="global grad norm before clipping", title="Gradient norm")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "clipping.png", dpi=120)
    plt.close(fig)
    write_json(out / "clipping.json", finite(runs))  # a diverged loss (NaN/inf) is stored as null
    return runs


# ---- REPORT.md ------------------------------------------------------------------------------


def machine() -> str:
    """One line: CPU/GPU, cores, OS, torch version."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {gpu}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")


def _ratio(curve: list[float], k: int) -> str:
    """curve[k] / curve[0] in short scientific notation ("-" when there is no curve)."""
    if not curve or curve[0] <= 0 or k >= len(curve):
        return "-"
    return f"{curve[k] / curve[0]:.1e}" if curve[k] > 0 else "0 (underflow)"


def write_markdown(cfg: DictConfig, out: Path, gf: dict, clip: dict, span: dict, seconds: dict,
                   context: list[str] | None = None, units: list[str] | None = None) -> None:
    """REPORT.md: how and where it was made, the figures, and their numbers as tables."""
    T = gf["seq_len"]
    lags = sorted({min(10, T - 1), T // 2, T - 1})
    md = [
        "# Vanishing and exploding gradients, measured", "",
        f"Generated by `python -m charlm.report size={cfg.size}` on {datetime.now():%Y-%m-%d %H:%M} in "
        f"{sum(seconds.values()) / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}).  ",
        f"Machine: {machine()}.", "",
        "## Gradient flow over time", "",
        f"Norm of the gradient of the loss at the last of {T} positions with respect to the embedding output "
        f"k positions earlier, averaged over tiny-shakespeare val windows; each model freshly initialised "
        f"(dashed) and after {gf['steps']} training steps (solid). A curve ends where the norm underflows "
        f"float32 to 0.", "",
        "![gradient flow](gradient_flow.png)", "",
        "| model | " + " | ".join(f"lag {k} / lag 0 at init | trained" for k in lags) + " |",
        "|---|" + "---|---|" * len(lags),
    ]
    for name, c in gf["curves"].items():
        md.append(f"| {name} | " + " | ".join(f"{_ratio(c['init'], k)} | {_ratio(c['trained'], k)}" for k in lags)
                  + " |")
    md += ["", "## Clipping", "",
           "`experiment=clip_off` vs `experiment=clip_on` (conf/experiment/): a ReLU RNN trained with SGD at a high "
           "learning rate; the two runs differ only in `clip.value`.", "", "![clipping](clipping.png)", "",
           "| run | clip.value | steps | first loss | last loss | max grad norm before clipping | outcome |",
           "|---|---|---|---|---|---|---|"]
    for name, r in clip.items():
        finite = [v for v in r["grad_norm"] if math.isfinite(v)] or [float("nan")]
        md.append(f"| {name} | {r['clip']:g} | {len(r['loss'])} | {r['loss'][0]:.2f} | {r['loss'][-1]:.3g} | "
                  f"{max(finite):.3g} | {r['diverged'] or 'trained'} |")
    md += ["", *markdown(span)]
    if context:
        md += ["", *context]
    if units:
        md += ["", *units]
    write_atomic(out / "REPORT.md", "\n".join(md) + "\n")


def context_section(source: str | None, out: Path) -> list[str]:
    """REPORT.md's lines on the context each family uses on real text: a charlm.compare folder's context.md,
    its figure copied beside REPORT.md (none when `context_from` is null). One ConfigError when it has none."""
    if not source:
        return []
    src = Path(source).expanduser()
    if not (src / "context.md").is_file() or not (src / "context.png").is_file():
        raise ConfigError(f"context_from={source}: no context.md and context.png there (the folder of a "
                          "charlm.compare run with context_seeds >= 1)")
    shutil.copyfile(src / "context.png", out / "context.png")
    lines = (src / "context.md").read_text().rstrip("\n").splitlines()
    return [*lines[:1], "", f"From the `charlm.compare` run in `{source}`: the spans above are what each family "
            "can hold on the synthetic task after a curriculum; this is what the same families use on tiny "
            "shakespeare after the compare's budget.", *lines[1:]]


def _job(cfg: DictConfig) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-run banners
    if cfg.size not in cfg.presets:
        raise ConfigError(f"size={cfg.size}: must be one of {', '.join(cfg.presets)}")
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = cfg.presets[cfg.size]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models, missing = available(cfg.models)
    if missing:
        print(f"report: no conf/model/NAME.yaml for {', '.join(missing)}: left out")
    if not models:
        raise ConfigError(f"models={list(cfg.models)}: none has a conf/model/NAME.yaml")
    context = context_section(cfg.context_from, out)  # checked before anything trains
    seconds, t0 = {}, time.perf_counter()
    gf = gradient_flow_study(cfg, preset, out, models)
    seconds["gradient flow"], t0 = time.perf_counter() - t0, time.perf_counter()
    clip = clipping_study(cfg, preset, out)
    seconds["clipping"], t0 = time.perf_counter() - t0, time.perf_counter()
    span = memory_span_study(cfg, preset, out, models)
    seconds["memory span"], t0 = time.perf_counter() - t0, time.perf_counter()
    units = None
    if preset.get("units"):  # the units that track the text (charlm.studies.units)
        from charlm.studies.units import markdown as units_markdown
        from charlm.studies.units import units_study

        units = units_markdown(units_study(cfg, preset, out))
        seconds["units"] = time.perf_counter() - t0
    write_markdown(cfg, out, gf, clip, span, seconds, context, units)
    print(f"report: wrote {out}/REPORT.md in {sum(seconds.values()) / 60:.1f} min")


def main() -> None:
    hydra_main("report", _job, check=lambda cfg: check_sections(cfg, {}, ReportTop))


if __name__ == "__main__":
    main()
