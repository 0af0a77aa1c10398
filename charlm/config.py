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
from dataclasses import field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from charlm.errors import ConfigError
from charlm.schemas import (
    MAPPING_RULES,
    PRIMITIVES,
    RULES,
    BudgetConfig,
    ClipConfig,
    EvalConfig,
    ExplainDuringTraining,
    SampleDuringTraining,
    TrainerConfig,
    TrainTop,
)

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
        if str in prims:  # str holds ints and floats too
            return (Optional[str] if optional else str), None
        if bool in prims and all(typing.get_origin(a) is typing.Literal for a in prims if a is not bool):
            literals = tuple(v for a in prims if a is not bool for v in typing.get_args(a))
            return Any, (True, False, *literals) + ((None,) if optional else ())
        return Any, None
    if origin in (list, tuple, typing.Sequence, __import__("collections.abc").abc.Sequence):
        inner = [a for a in args if a is not Ellipsis]
        t, _ = _omegaconf_type(inner[0]) if inner else (Any, None)
        return typing.List[t if t in PRIMITIVES else Any], None
    if origin is dict or hint is dict:
        return Any, None
    return Any, None


def _hints_one_by_one(fn) -> dict:
    """Type hints of `fn`'s parameters that can be resolved, skipping those that cannot."""
    namespace = {**vars(typing), **getattr(fn, "__globals__", {})}
    hints = {}
    for name, ann in getattr(fn, "__annotations__", {}).items():
        try:
            hints[name] = eval(ann, namespace) if isinstance(ann, str) else ann  # noqa: S307 - annotations only
        except Exception:  # noqa: BLE001
            continue
    return hints


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
    except Exception:  # noqa: BLE001 - one unresolvable annotation: resolve the others one by one
        hints = _hints_one_by_one(fn)
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
        if isinstance(default, (list, tuple)) and typing.get_origin(t) is list:
            fields.append((name, t, field(default_factory=lambda d=list(default): list(d))))
            continue
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
    if typing.get_origin(t) is list:
        return f"a list of {_type_name(typing.get_args(t)[0])}s".replace("an integers", "integers").replace(
            "a numbers", "numbers").replace("a strings", "strings")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def _merge(schema, node: DictConfig, prefix: str, allow_extra: bool) -> DictConfig:
    """Validate `node` against `schema` with OmegaConf; one ConfigError naming the key on failure."""
    def base():
        b = OmegaConf.structured(schema)
        if allow_extra:
            OmegaConf.set_struct(b, False)
        return b

    try:
        return OmegaConf.merge(base(), node)
    except OmegaConfBaseException as e:
        hints = typing.get_type_hints(schema)
        for key in node:  # find the key that failed, to name it
            if key not in hints and not allow_extra:
                known = ", ".join(sorted(h for h in hints if not h.startswith("_")))
                raise ConfigError(f"unknown config key {prefix}{key} (known: {known})") from None
            try:
                OmegaConf.merge(base(), {key: node[key]})
            except OmegaConfBaseException:
                if dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
                    _merge(hints[key], node[key], f"{prefix}{key}.", allow_extra=False)  # names the inner key
                raise ConfigError(f"{prefix}{key}={_show(node[key])}: expected {_type_name(hints[key])}") from None
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {str(e).splitlines()[0]}") from None


def _show(v) -> str:
    if isinstance(v, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(v))
    return str(v)


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value


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
        if value is None or str(key).startswith("_"):
            continue
        if isinstance(value, (DictConfig, dict)):
            rule = _rule_for(full)
            if rule is not None and (full not in MAPPING_RULES or not rule[0](_plain(value))):
                raise ConfigError(f"{full}={_show(value)}: must be {rule[1]}")  # a mapping where a value belongs
            continue
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value)
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


def check_keys(node: DictConfig, schema: type, prefix: str, allow_extra: bool = False) -> DictConfig:
    """Type- and range-check `node` against the dataclass `schema` (extra keys pass when allow_extra)."""
    merged = _merge(schema, _resolved(node), prefix, allow_extra=allow_extra)
    _check_ranges(merged, prefix)
    return merged


def check_target_group(node: DictConfig, prefix: str) -> DictConfig:
    """Type-check one `_target_` node (model, data, optim, scheduler, a logger, a callback)."""
    if "_target_" not in node:
        raise ConfigError(f"{prefix.rstrip('.')}: needs a _target_ (the class or function it builds)")
    schema, meta = target_schema(str(node._target_))
    merged = _merge(schema, node, prefix, allow_extra=meta["open_ended"])
    _check_ranges(merged, prefix, meta["choices"])
    return merged


def _resolved(cfg: DictConfig) -> DictConfig:
    """A plain copy of `cfg` without the hydra section, interpolations resolved (one error line if one cannot be)."""
    try:
        keys = [k for k in cfg if k != "hydra"]
        return OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True))
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key {getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None


def check_sections(cfg: DictConfig, schemas: dict[str, type], top: type | None, targets: tuple[str, ...] = (),
                   target_maps: tuple[str, ...] = ()) -> None:
    """Check `cfg`: each fixed section against its dataclass, each `_target_` group against its target,
    each map of `_target_` entries (logger, callbacks) entry by entry, the rest against `top`."""
    cfg = _resolved(cfg)
    known = set(schemas) | set(targets) | set(target_maps)
    with_target = {}
    for name in targets:
        if cfg.get(name):  # an empty group (scheduler=constant) builds nothing
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
    if isinstance(cfg.get("data"), DictConfig) and "path" in cfg.data.keys() and OmegaConf.is_missing(cfg.data, "path"):
        raise ConfigError(f"data.path: required: data={cfg.data.get('name', 'this corpus')} has no default file "
                          "(data.path=FILE)")
    check_sections(cfg, {"trainer": TrainerConfig, "clip": ClipConfig, "sample": SampleDuringTraining,
                         "eval": EvalConfig, "budget": BudgetConfig, "explain": ExplainDuringTraining}, TrainTop,
                   targets=("data", "model", "optim", "scheduler"), target_maps=("logger", "callbacks"))
