"""Typed configs, checked at compose time: every key of every group has a type and, where it matters,
a range. A wrong type or an impossible value is one line naming the key, the value and what is
expected (exit status 2 through `charlm.cli`).

Two sources of types, both OmegaConf structured configs (OmegaConf does the type checking):
- groups without a `_target_` (trainer, clip, sample, eval, the entry points' own keys) are the
  dataclasses below;
- groups with a `_target_` (model, data, optim, scheduler, logger and callbacks entries) get a
  dataclass derived from the target's signature and type hints (`target_schema`), as hydra-zen's
  `builds(..., populate_full_signature=True)` does. A model written outside charlm is typed the
  same way, from its own signature, with no change here.
Ranges and choices OmegaConf cannot express are `RULES` (by dotted key) and `Literal[...]` hints.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from charlm.errors import ConfigError

PRIMITIVES = (int, float, bool, str)
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true", "64",
              "transformer-engine", "16", "bf16")


@dataclass
class ClipConfig:
    algorithm: str = "norm"           # norm | value
    value: float = 1.0                # >= 0; 0 disables clipping


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
    window: int = 256
    window_batches: int = 20


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
    model: dict = field(default_factory=dict)


@dataclass
class ReportTop:
    size: str = "cpu"
    out_dir: str = "reports"
    models: Any = field(default_factory=lambda: ["rnn", "lstm", "gru", "transformer"])
    span_threshold: float = 0.9
    device: str = "auto"
    seed: int = 1337
    presets: Any = None


# Ranges and choices, by dotted key (a `*` matches one level: any model's key of that name).
def _pos(v):
    return v > 0


def _nonneg(v):
    return v >= 0


RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "seed": (_nonneg, ">= 0"),
    "stop_at_step": (_pos, "> 0"),
    "gradflow_every": (_pos, "> 0"),
    "gates_every": (_pos, "> 0"),
    "divergence_factor": (_pos, "> 0"),
    "clip.value": (_nonneg, ">= 0 (0 disables clipping)"),
    "clip.algorithm": (lambda v: v in ("norm", "value"), "one of norm, value"),
    "sample.n_chars": (_nonneg, ">= 0"),
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
    "eval.window": (lambda v: v >= 1, ">= 1"),
    "eval.window_batches": (_nonneg, ">= 0 (0 skips the nanoGPT-style figure)"),
    "trainer.max_steps": (_pos, "a positive number of steps"),
    "trainer.precision": (lambda v: str(v) in PRECISIONS, f"one of {', '.join(PRECISIONS[:6])}"),
    "trainer.val_check_interval": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                                   "a positive number (steps, or a fraction of an epoch)"),
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


# ---- schemas derived from a `_target_` ----------------------------------------------------------


def _omegaconf_type(hint) -> tuple[Any, tuple | None]:
    """A type OmegaConf can check, and the allowed values when the hint is a Literal."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _omegaconf_type(args[0])
    if hint in PRIMITIVES or hint is Any:
        return hint, None
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return (kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in PRIMITIVES else Any), args
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)]
        prims = [a for a in inner if a in PRIMITIVES or typing.get_origin(a) is typing.Literal]
        if len(prims) == 1 or (len(inner) == 1 and typing.get_origin(inner[0]) in (list, tuple)):
            t, choices = _omegaconf_type(prims[0] if prims else inner[0])
            return (Optional[t] if optional and t is not Any else t), choices
        if set(prims) == {int, float}:
            return (Optional[float] if optional else float), None
        return Any, None
    if origin in (list, tuple, typing.Sequence, __import__("collections.abc").abc.Sequence):
        inner = [a for a in args if a is not Ellipsis]
        t, _ = _omegaconf_type(inner[0]) if inner else (Any, None)
        return typing.List[t if t in PRIMITIVES else Any], None
    if origin is dict or hint is dict:
        return Any, None
    return Any, None


_SCHEMAS: dict[str, tuple[type, dict]] = {}


def target_schema(target_path: str) -> tuple[type, dict[str, tuple]]:
    """A dataclass typed from the signature of `_target_`, and the Literal choices per key."""
    if target_path in _SCHEMAS:
        return _SCHEMAS[target_path]
    from hydra.utils import get_method

    try:
        target = get_method(target_path)
    except Exception:  # noqa: BLE001
        raise ConfigError(f"_target_={target_path}: no such class or function (is it importable?)") from None
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the defaults' types
        hints = {}
    params = inspect.signature(target).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    fields, choices = [("_target_", str, field(default=target_path)), ("_partial_", bool, field(default=False)),
                      ("_convert_", Optional[str], field(default=None))], {}
    for name, p in params.items():
        if name in ("self", "vocab_size", "optimizer", "params") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = hints.get(name)
        if hint is None and p.default is not p.empty and p.default is not None and type(p.default) in PRIMITIVES:
            hint = type(p.default)
        t, ch = _omegaconf_type(hint) if hint is not None else (Any, None)
        if int in (t, *typing.get_args(t)) and float not in (t, *typing.get_args(t)) and isinstance(p.default, float):
            t = float
        default = p.default if p.default is not p.empty else None  # required: filled at call time (_partial_)
        if isinstance(default, (list, dict, tuple)) or (default is not MISSING and not _storable(default)):
            default = None if not isinstance(default, (list, dict, tuple)) else MISSING
            t = Any
        if default is None and t is not Any and typing.get_origin(t) is not typing.Union:
            t = Optional[t]
        fields.append((name, t, field(default=default)))
        if ch is not None:
            choices[name] = ch
    cls = dataclasses.make_dataclass(f"{getattr(target, '__name__', 'Target')}Config", fields)
    _SCHEMAS[target_path] = (cls, {"open_ended": open_ended, "choices": choices})
    return _SCHEMAS[target_path]


def _storable(v) -> bool:
    return v is None or type(v) in PRIMITIVES


# ---- checking -----------------------------------------------------------------------------------


def _type_name(t) -> str:
    if typing.get_origin(t) is typing.Union:
        inner = [a for a in typing.get_args(t) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def _merge(schema, node: DictConfig, prefix: str, allow_extra: bool) -> DictConfig:
    """Validate `node` against `schema` with OmegaConf; one ConfigError naming the key on failure."""
    base = OmegaConf.structured(schema)
    if allow_extra:
        OmegaConf.set_struct(base, False)
    try:
        return OmegaConf.merge(base, node)
    except OmegaConfBaseException as e:
        key = f"{prefix}{e.full_key}" if getattr(e, "full_key", None) else prefix.rstrip(".")
        leaf = str(getattr(e, "full_key", "") or "").split(".")[-1]
        value = node.get(leaf, "?") if isinstance(node, DictConfig) and leaf else "?"
        hints = typing.get_type_hints(schema)
        if type(e).__name__ == "ConfigKeyError" or leaf not in hints:
            known = ", ".join(sorted(h for h in hints if not h.startswith("_")))
            raise ConfigError(f"unknown config key {key} (known: {known})") from None
        raise ConfigError(f"{key}={_show(value)}: expected {_type_name(hints[leaf])}") from None


def _show(v) -> str:
    if isinstance(v, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(v))
    return str(v)


def _rule_for(key: str):
    if key in RULES:
        return RULES[key]
    section, _, leaf = key.rpartition(".")
    for pattern, rule in RULES.items():
        psec, _, pleaf = pattern.rpartition(".")
        if psec == section and pleaf.startswith("*") and leaf.endswith(pleaf[1:]):
            return rule
    return None


def _check_ranges(node, prefix: str, choices: dict | None = None) -> None:
    for key, value in node.items() if isinstance(node, (dict, DictConfig)) else ():
        full = f"{prefix}{key}"
        if isinstance(value, (DictConfig, dict)) or value is None or str(key).startswith("_"):
            continue
        if choices and key in choices and value not in choices[key]:
            raise ConfigError(f"{full}={value}: must be one of {', '.join(map(str, choices[key]))}")
        rule = _rule_for(full)
        if rule is None:
            continue
        ok, expected = rule
        try:
            good = ok(value)
        except TypeError:
            good = False
        if isinstance(value, float) and not math.isfinite(value):
            good = False
        if not good:
            raise ConfigError(f"{full}={_show(value)}: must be {expected}")


def check_target_group(node: DictConfig, prefix: str) -> DictConfig:
    """Type-check one `_target_` node (model, data, optim, scheduler, a logger, a callback)."""
    if "_target_" not in node:
        raise ConfigError(f"{prefix.rstrip('.')}: needs a _target_ (the class or function it builds)")
    schema, meta = target_schema(str(node._target_))
    merged = _merge(schema, node, prefix, allow_extra=meta["open_ended"])
    _check_ranges(merged, prefix, meta["choices"])
    return merged


def check_sections(cfg: DictConfig, schemas: dict[str, type], top: type | None, targets: tuple[str, ...] = (),
                   target_maps: tuple[str, ...] = ()) -> None:
    """Check `cfg`: each fixed section against its dataclass, each `_target_` group against its target,
    each map of `_target_` entries (logger, callbacks) entry by entry, the rest against `top`."""
    known = set(schemas) | set(targets) | set(target_maps)
    with_target = {}
    for name in targets:
        if cfg.get(name) is not None:
            with_target[name] = check_target_group(cfg[name], f"{name}.")
    for name in target_maps:
        for key, entry in (cfg.get(name) or {}).items():
            if entry is not None:
                check_target_group(entry, f"{name}.{key}.")
    for name, schema in schemas.items():
        if cfg.get(name) is not None:
            _check_ranges(_merge(schema, cfg[name], f"{name}.", allow_extra=False), f"{name}.")
    if top is not None:
        rest = OmegaConf.create({k: cfg[k] for k in cfg if k not in known and k != "hydra"})
        _check_ranges(_merge(top, rest, "", allow_extra=False), "")
    for name, merged in with_target.items():
        _check_ranges(merged, f"{name}.")


def check_train(cfg: DictConfig) -> None:
    """Every key of a composed train config: types, ranges, choices; one ConfigError on the first bad one."""
    check_sections(cfg, {"trainer": TrainerConfig, "clip": ClipConfig, "sample": SampleDuringTraining,
                         "eval": EvalConfig}, TrainTop,
                   targets=("model", "data", "optim", "scheduler"), target_maps=("logger", "callbacks"))
