"""Checkpoints and exported model folders, read as data, never as code.

A checkpoint loads with `weights_only=True`; an exported folder (`charlm.export`) is safetensors and
JSON. The configs inside either are checked before anything is built from them (`check_section`):

- a `_target_` names a class charlm registers: one a YAML of the config group names (conf/model/,
  conf/optim/, conf/scheduler/, and the same groups in every folder on the running command's Hydra
  search path, so an outside model is trusted by naming its config folder), a model class of
  charlm.models, a torch.optim optimizer, a charlm.training.schedule function, or one the caller names (`trusted`);
- no Hydra key (`_target_`, `_args_`, ...) below the top, and no interpolation;
- plain values (null, booleans, numbers, strings, lists and maps of them) of the types the target's
  signature declares (charlm.config, as for the command line).

Anything else is one CheckpointError line (exit status 2), raised before the named code is imported.
The model alone loads without Lightning (sampling starts fast). Writing is atomic
(`charlm.training.build.AtomicCheckpointIO`).
"""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from charlm.errors import CheckpointError, ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # charlm's own config groups
SECTIONS = ("model", "optim", "scheduler")  # the configs a checkpoint holds that name code to build
TOP_KEYS = {"model": ("_target_",), "optim": ("_target_", "_partial_"), "scheduler": ("_target_", "_partial_")}
PACKAGED = {"model": "a model class of charlm.models", "optim": "a torch.optim optimizer",
            "scheduler": "a charlm.training.schedule function"}
EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json")  # what `charlm.export` writes, besides README.md


# ---- the allowlist -------------------------------------------------------------------------------------


def _config_folders() -> list[Path]:
    """charlm's conf/ and, inside a running Hydra command, every folder on its config search path."""
    folders = [CONF_DIR]
    try:
        from hydra.core.hydra_config import HydraConfig

        sources = HydraConfig.get().runtime.config_sources if HydraConfig.initialized() else []
    except Exception:  # noqa: BLE001 - no Hydra, or not inside a command
        sources = []
    for source in sources:
        if source.schema == "file":
            folders.append(Path(source.path))
        elif source.schema == "pkg":
            try:
                folders.append(Path(str(importlib.resources.files(source.path.replace("/", ".")))))
            except Exception:  # noqa: BLE001 - a package without files on disk
                continue
    return list(dict.fromkeys(f.resolve() for f in folders))


def registered_targets(group: str) -> set[str]:
    """The `_target_` of every conf/GROUP/*.yaml in the config folders (`_config_folders`)."""
    import yaml

    targets = set()
    for folder in _config_folders():
        for f in sorted((folder / group).glob("*.yaml")):
            try:
                node = yaml.safe_load(f.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(node, dict) and isinstance(node.get("_target_"), str):
                targets.add(node["_target_"])
    return targets


def packaged_target(group: str, target: str) -> bool:
    """Whether `target` is charlm's own model class, a torch.optim optimizer or a charlm.training.schedule function
    (only charlm's modules and torch.optim are imported to tell)."""
    if group == "model":
        m = re.fullmatch(r"charlm\.models\.([a-z_][a-z0-9_]*)\.([A-Za-z_]\w*)", target)
        if not m or not (Path(__file__).parent / "models" / f"{m[1]}.py").is_file():
            return False
        obj = getattr(importlib.import_module(f"charlm.models.{m[1]}"), m[2], None)
        return inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and obj.__module__ == f"charlm.models.{m[1]}"
    if group == "optim":
        m = re.fullmatch(r"torch\.optim\.([A-Za-z]\w*)", target)
        obj = getattr(torch.optim, m[1], None) if m else None
        return inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)
    if group == "scheduler":
        m = re.fullmatch(r"charlm\.(?:training\.)?schedule\.([a-z]\w*)", target)  # the old path too (charlm.MOVED)
        obj = getattr(importlib.import_module("charlm.training.schedule"), m[1], None) if m else None
        return inspect.isfunction(obj) and obj.__module__ == "charlm.training.schedule"
    return False


# ---- the checks ----------------------------------------------------------------------------------------


def check_plain(value, key: str, where, top_keys: Iterable[str] = ()) -> None:
    """Refuse anything in `value` but plain data: a Hydra key (except `top_keys` at its top), an
    interpolation, an object."""
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str):
        if "${" in value:
            raise CheckpointError(f"{where}: {key}={value[:60]!r}: an interpolation; a config read from a file "
                                  "holds plain values only")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{key}[{i}]", where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: {key}: a key {k!r} that is not a string")
            if k.startswith("_") and k not in top_keys:
                what = "a nested _target_" if k == "_target_" else f"the Hydra key {k}"
                raise CheckpointError(f"{where}: {key}.{k}: {what}; a config read from a file is data and names "
                                      "no code to run")
            check_plain(v, f"{key}.{k}", where)
        return
    raise CheckpointError(f"{where}: {key}: a {type(value).__name__}, not a plain value")


def check_section(section: str, cfg, where, trusted: Iterable[str] = ()) -> dict:
    """`cfg`, the `section` config (model, optim, scheduler) read from a file, if it names a target that
    charlm registers or the caller trusts, with plain values of the types its signature declares."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("_target_"), str):
        raise CheckpointError(f"{where}: {section}: not a config naming its class (_target_)")
    check_plain(cfg, section, where, TOP_KEYS[section])
    target = cfg["_target_"]
    if target not in trusted and target not in registered_targets(section) and not packaged_target(section, target):
        raise CheckpointError(
            f"{where}: {section}._target_={target[:80]}: not a {section} charlm registers (conf/{section}/*.yaml or "
            f"{PACKAGED[section]}); for a class of your own, name its config folder: "
            f"'hydra.searchpath=[file://DIR]' with DIR/{section}/NAME.yaml")
    from omegaconf import OmegaConf

    from charlm.config import check_target_group

    try:
        check_target_group(OmegaConf.create(cfg), f"{section}.")
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def check_hparams(hp: dict, where, trusted: Iterable[str] = (), sections: Iterable[str] = SECTIONS) -> dict:
    """A checkpoint's hyper-parameters with every config in `sections` checked (`check_section`)."""
    trusted = tuple(trusted)
    for section in sections:
        if hp.get(section) is not None:
            check_section(section, hp[section], where, trusted)
    return hp


def command_targets(cfg) -> tuple[str, ...]:
    """The targets a composed command names itself (model, optim, scheduler): the user's own config, trusted."""
    return tuple(str(cfg[s]._target_) for s in SECTIONS if cfg.get(s) and "_target_" in cfg[s])


# ---- reading -------------------------------------------------------------------------------------------


def read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint's dict, loaded with `weights_only=True`, its hyper-parameters plain data (`check_plain`);
    a one-line CheckpointError otherwise."""
    p = Path(str(path))
    if p.is_dir():
        raise CheckpointError(f"{path}: a folder (an exported model); this needs a .ckpt file")
    if not p.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, random bytes...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds objects other than tensors and plain data, refused by weights_only loading"
        raise CheckpointError(f"{path}: not a loadable checkpoint ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "vocab" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"{path}: not a charlm checkpoint (no state_dict, model config and vocab)")
    for key, value in ckpt["hyper_parameters"].items():
        if not isinstance(key, str) or key.startswith("_"):
            raise CheckpointError(f"{path}: hyper_parameters.{key}: not a charlm hyper-parameter")
        check_plain(value, key, path, TOP_KEYS.get(key, ()))
    return ckpt


def check_checkpoint(path, trusted: Iterable[str] = ()) -> dict:
    """The checkpoint at `path` with every config in it that names code checked: before a resume."""
    ckpt = read_checkpoint(path)
    check_hparams(ckpt["hyper_parameters"], path, trusted)
    return ckpt


def _vocab(d, where):
    from charlm.data.vocab import CharVocab

    try:
        return CharVocab.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a vocabulary ({e})") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({str(e).splitlines()[0][:120]})") from None


def _load_weights(load, where) -> None:
    try:
        load()
    except Exception as e:  # noqa: BLE001 - missing or extra keys, wrong shapes, a corrupt file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: the weights do not fit the model its config builds ({reason})") from None


def load_export(folder, map_location="cpu", trusted: Iterable[str] = ()):
    """(model in eval mode, vocab, hyper-parameters) from a folder `charlm.export` wrote: config.json
    (the class, checked as a checkpoint's is, and its plain arguments), vocab.json, model.safetensors."""
    from safetensors.torch import load_model as load_safetensors

    from charlm.models.contract import build_model

    folder = Path(folder)
    if missing := [f for f in EXPORT_FILES if not (folder / f).is_file()]:
        raise CheckpointError(f"{folder}: a folder, but not an exported charlm model (no {', '.join(missing)})")
    where = folder / "config.json"
    config = _read_json(where)
    if not isinstance(config, dict) or not isinstance(config.get("class"), str) or \
            not isinstance(config.get("args"), dict):
        raise CheckpointError(f"{where}: not an exported model's config (needs class and args)")
    check_plain(config, "config", where)
    model_cfg = check_section("model", {"_target_": config["class"], **config["args"]}, where, trusted)
    vocab = _vocab(_read_json(folder / "vocab.json"), folder / "vocab.json")
    if config.get("vocab_size") not in (None, len(vocab)):
        raise CheckpointError(f"{where}: vocab_size={config['vocab_size']}, but vocab.json holds {len(vocab)} symbols")
    model = build_model(model_cfg, len(vocab))
    weights = folder / "model.safetensors"
    _load_weights(lambda: load_safetensors(model, str(weights), strict=True, device=str(map_location)), weights)
    hp = {"model": model_cfg, "vocab": vocab.to_dict(), "model_name": str(config.get("model_name") or "model")}
    return model.eval(), vocab, hp


def load_model(path, map_location="cpu", trusted: Iterable[str] = ()):
    """(model in eval mode, vocab, hyper-parameters) from a checkpoint or an exported folder, its model config
    checked (`check_section`) before it is built; no Lightning import, for fast sampling. `trusted`: more
    model classes (their `_target_`) the caller vouches for."""
    from charlm.models.contract import build_model

    if Path(str(path)).is_dir():
        return load_export(path, map_location, trusted)
    ckpt = read_checkpoint(path, map_location)
    hp = check_hparams(ckpt["hyper_parameters"], path, trusted, sections=("model",))
    vocab = _vocab(hp["vocab"], path)
    model = build_model(hp["model"], len(vocab))
    prefix = "model."
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    _load_weights(lambda: model.load_state_dict(weights), path)
    return model.eval(), vocab, hp


def save_model(path, model, model_cfg: dict, vocab, name: str) -> Path:
    """A checkpoint `load_model` reads back (the model's weights, its config, the vocabulary and its name),
    without Lightning: for models built outside charlm.train (benchmarks, tests)."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"vocab": vocab.to_dict(), "model": model_cfg, "model_name": name}}, path)
    return Path(path)
