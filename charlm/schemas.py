"""The declared types of charlm's own config sections (dataclasses, checked by OmegaConf), and the
ranges and choices OmegaConf cannot express (`RULES`, by dotted key; `*` matches a key suffix).
Groups with a `_target_` are typed from their target's signature instead (charlm.config)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

UNITS = ("char", "byte")  # what a corpus is read as: characters (UTF-8 text) or raw bytes

PRIMITIVES = (int, float, bool, str)
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true", "64",
              "transformer-engine", "16", "bf16")


@dataclass
class ClipConfig:
    algorithm: str = "norm"           # norm | value
    value: float = 1.0                # >= 0; 0 disables clipping


@dataclass
class ExplainDuringTraining:
    n_chars: int = 0                  # > 0: explain.html/png for this many val chars at the end


@dataclass
class SampleDuringTraining:
    prompt: str = "\n"
    n_chars: int = 200
    temperature: float = 0.8


@dataclass
class EvalConfig:
    streams: int = 8
    chunk: int = 256
    stride: Optional[int] = None
    batch_size: int = 64
    max_chars: Optional[int] = None
    final_max_chars: Optional[int] = None
    window: int = 256
    window_batches: int = 20


@dataclass
class BudgetConfig:
    """What bounds a run besides trainer.max_steps (charlm.training.budget)."""

    seconds: Optional[float] = None   # wall seconds of training, validations included (Lightning's Timer)
    tokens: Optional[int] = None      # training tokens: steps = ceil(tokens / tokens per step)
    evals: Optional[int] = None       # validations spread over a seconds/tokens budget (null: 6)


@dataclass
class TrainerConfig:
    """The Lightning Trainer arguments charlm's configs use (others: `+trainer.KEY=...` is refused)."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    max_steps: int = 5000
    max_time: Optional[str] = None
    val_check_interval: Any = 1000
    check_val_every_n_epoch: Optional[int] = None
    log_every_n_steps: int = 50
    num_sanity_val_steps: int = 0
    enable_model_summary: bool = False
    enable_progress_bar: bool = True
    benchmark: Optional[bool] = None
    deterministic: Optional[bool] = None
    limit_val_batches: Any = None
    accumulate_grad_batches: int = 1


@dataclass
class TrainTop:
    """`python -m charlm.train`'s own keys."""

    seed: int = 1337
    ckpt_path: Optional[str] = None
    stop_at_step: Optional[int] = None
    gradflow_every: Optional[int] = None
    gates_every: Optional[int] = None
    divergence_factor: Optional[float] = 10.0
    state_reset: float = 0.0
    compile: bool = False


@dataclass
class SampleTop:
    ckpt_path: str = MISSING
    prompt: str = ""
    n_chars: int = 500
    temperature: float = 0.8
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    num_samples: int = 1
    unknown: str = "error"
    infill: Optional[str] = None
    mask_char: str = "_"
    device: str = "auto"
    raw: bool = False


@dataclass
class GradflowSizes:
    """Sizes for every model that has the key (the others keep conf/model/*.yaml)."""

    embed_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    num_layers: Optional[int] = None
    n_embd: Optional[int] = None
    n_layer: Optional[int] = None
    n_head: Optional[int] = None


@dataclass
class GradflowTop:
    models: Any = field(default_factory=lambda: ["rnn", "lstm", "gru", "transformer"])
    out_dir: str = "reports"
    steps: int = 200
    seq_len: int = 100
    n_rows: int = 32
    batch_size: int = 32
    lr: float = 3e-3
    clip: float = 1.0
    ckpt_path: Optional[str] = None
    data_path: Optional[str] = None
    device: str = "auto"
    seed: int = 1337
    model: GradflowSizes = field(default_factory=GradflowSizes)


@dataclass
class ReportTop:
    size: str = "cpu"
    out_dir: str = "reports"
    models: Any = field(default_factory=lambda: ["rnn", "lstm", "gru", "transformer"])
    span_threshold: float = 0.9
    device: str = "auto"
    seed: int = 1337
    context_from: Optional[str] = None
    presets: Any = None


# Ranges and choices, by dotted key (a `*` matches one level: any model's key of that name).
def _is_duration(v: str) -> bool:
    """DD:HH:MM:SS, as Lightning's max_time and time-based val_check_interval take it."""
    parts = v.split(":")
    return len(parts) == 4 and all(p.isdigit() for p in parts) and any(int(p) for p in parts)


def _pos(v):
    return v > 0


def _nonneg(v):
    return v >= 0


MAPPING_RULES = {"data.hf_splits"}  # RULES keys whose value is a mapping (the rest take plain values)
RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "seed": (_nonneg, ">= 0"),
    "stop_at_step": (_pos, "> 0"),
    "gradflow_every": (_pos, "> 0"),
    "gates_every": (_pos, "> 0"),
    "divergence_factor": (_pos, "> 0"),
    "state_reset": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "clip.value": (_nonneg, ">= 0 (0 disables clipping)"),
    "clip.algorithm": (lambda v: v in ("norm", "value"), "one of norm, value"),
    "sample.n_chars": (_nonneg, ">= 0"),
    "explain.n_chars": (lambda v: 0 <= v <= 20_000, "in 0..20,000 (0: no page)"),
    "n_chars": (_nonneg, ">= 0"),
    "top_k": (_pos, ">= 1 (or null)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (or null)"),
    "num_samples": (_pos, ">= 1"),
    "unknown": (lambda v: v in ("error", "skip"), "one of error, skip"),
    "device": (lambda v: v in ("auto", "cpu", "cuda", "mps") or str(v).startswith("cuda:"), "auto, cpu, cuda or mps"),
    "mask_char": (lambda v: len(v) == 1, "a single character"),
    "eval.streams": (_pos, ">= 1"),
    "eval.chunk": (_pos, ">= 1"),
    "eval.stride": (_pos, ">= 1 (or null: half the context)"),
    "eval.batch_size": (_pos, ">= 1"),
    "eval.max_chars": (lambda v: v >= 2, ">= 2 (or null: the whole split)"),
    "eval.final_max_chars": (_pos, ">= 1 (or null: the whole split)"),
    "eval.window": (lambda v: v >= 1, ">= 1"),
    "eval.window_batches": (_nonneg, ">= 0 (0 skips the nanoGPT-style figure)"),
    "trainer.devices": (lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= -1) or v == "auto"
                        or (isinstance(v, str) and v.replace(",", "").isdigit())
                        or (isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v)),
                        "a number of devices, a list of device ids, or auto"),
    "models": (lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(i, str) for i in v)),
               "a model name or a list of them"),
    "logger.wandb.group": (lambda v: isinstance(v, str), "a string (or null)"),
    "trainer.max_time": (_is_duration, "a duration DD:HH:MM:SS"),
    "trainer.max_steps": (_pos, "a positive number of steps"),
    "trainer.precision": (lambda v: str(v) in PRECISIONS, f"one of {', '.join(PRECISIONS[:6])}"),
    "trainer.val_check_interval": (lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
                                   or (isinstance(v, str) and _is_duration(v)),
                                   "a positive number of steps, or a duration DD:HH:MM:SS"),
    "trainer.log_every_n_steps": (_pos, ">= 1"),
    "trainer.num_nodes": (_pos, ">= 1"),
    "trainer.accumulate_grad_batches": (_pos, ">= 1"),
    "trainer.limit_val_batches": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                                  "a number >= 0 (or null)"),
    "data.block_size": (_pos, "a positive integer"),
    "data.batch_size": (_pos, "a positive integer"),
    "data.val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "data.test_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.sampling": (lambda v: v in ("auto", "random", "stream"), "one of auto, random, stream"),
    "data.errors": (lambda v: v in ("strict", "replace"), "one of strict, replace"),
    "data.unit": (lambda v: v in UNITS, "one of " + ", ".join(UNITS)),
    "data.max_chars": (_pos, "a positive number of characters (or null: all)"),
    "data.column": (lambda v: isinstance(v, str) and v != "", "a column name"),
    "data.hf_splits": (lambda v: v is None or (hasattr(v, "keys") and {"train", "val"} <= set(map(str, v.keys()))
                                               <= {"train", "val", "test"}
                                               and all(isinstance(x, str) and x for x in v.values())),
                       "null, or {train: NAME, val: NAME} (test: NAME optional): the dataset's split names"),
    "optim.lr": (_pos, "> 0"),
    "optim.weight_decay": (_nonneg, ">= 0"),
    "optim.momentum": (_nonneg, ">= 0"),
    "optim.eps": (_pos, "> 0"),
    "scheduler.warmup_steps": (_nonneg, ">= 0"),
    "scheduler.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "scheduler.pct_start": (lambda v: 0 < v < 1, "in (0, 1)"),
    "model.*_dim": (_pos, "a positive integer"),
    "model.num_layers": (_pos, "a positive integer"),
    "model.n_layer": (_pos, "a positive integer"),
    "model.n_head": (_pos, "a positive integer"),
    "model.n_embd": (_pos, "a positive integer"),
    "model.block_size": (lambda v: v >= 2, ">= 2"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "steps": (_nonneg, ">= 0"),
    "span_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "size": (lambda v: v in ("tiny", "cpu", "gpu"), "one of tiny, cpu, gpu"),
    "seq_len": (lambda v: v >= 2, ">= 2"),
    "n_rows": (_pos, ">= 1"),
    "batch_size": (_pos, ">= 1"),
    "lr": (_pos, "> 0"),
    "clip": (_nonneg, ">= 0"),
}
