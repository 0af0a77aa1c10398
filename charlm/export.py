"""`python -m charlm.export ckpt_path=PATH out=DIR`: a trained model as a folder that stands alone.

    DIR/model.safetensors   the weights (safetensors: tensors and a JSON header, nothing to unpickle)
    DIR/config.json         the model's registered name, its class and constructor arguments, plain values
    DIR/vocab.json          the symbols (id i is the i-th) and the unit (char or byte)
    DIR/README.md           a short model card: model, parameters, corpus, yardstick figure, commands

charlm.sample, charlm.evaluate and charlm.explain take DIR wherever they take a checkpoint, and give the
same results (`charlm.checkpoint.load_model`); outside charlm it loads with torch, safetensors and the
model's class (docs/export.md). The folder is written whole or not at all.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import MISSING, DictConfig

from charlm.atomic import write_json
from charlm.checkpoint import load_model
from charlm.cli import hydra_main
from charlm.config import check_sections
from charlm.data.vocab import unit_label
from charlm.errors import ConfigError

FORMAT = "charlm.export"  # config.json's "format"; "version" counts its changes


@dataclass
class ExportTop:
    ckpt_path: str = MISSING
    out: str = MISSING


def check_out(out: Path) -> None:
    """Refuse an `out` that holds anything: an export never clobbers."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out={out}: exists and is not an empty folder; name a new one")


def check(cfg: DictConfig) -> None:
    """Types of the keys, and an `out` that can be written (before Hydra starts)."""
    check_sections(cfg, {}, ExportTop)
    check_out(Path(cfg.out))


def model_config(model, vocab, hp: dict) -> dict:
    """config.json: the registered name, the class and its constructor arguments (vocab_size apart)."""
    args = {k: v for k, v in hp["model"].items() if k != "_target_"}
    return {"format": FORMAT, "version": 1, "model_name": hp.get("model_name") or "model",
            "class": hp["model"]["_target_"], "args": args, "vocab_size": len(vocab), "unit": vocab.unit,
            "params": sum(p.numel() for p in model.parameters())}


def run_record(ckpt: Path) -> tuple[dict, dict, list[str]]:
    """What the run that wrote `ckpt` (RUN/checkpoints/X.ckpt) left beside it, as data: results.json when it
    scored this very checkpoint, the composed config, the training command's overrides."""
    import json

    run = ckpt.resolve().parent.parent
    results, config, overrides = {}, {}, []
    try:
        found = json.loads((run / "results.json").read_text(encoding="utf-8"))
        if isinstance(found, dict) and Path(str(found.get("best_ckpt"))).name == ckpt.name:
            results = found
    except (OSError, ValueError):
        pass
    for name, default in (("config.yaml", {}), ("overrides.yaml", [])):
        try:
            found = yaml.safe_load((run / ".hydra" / name).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            found = None
        if name == "config.yaml":
            config = found if isinstance(found, dict) else default
        else:
            overrides = [str(o) for o in found] if isinstance(found, list) else default
    return results, config, overrides


def model_card(config: dict, ckpt: Path, out: Path) -> str:
    """README.md: what the model is, what it was trained on, how it scored (when the run recorded it), and
    the commands that made it and that use it."""
    results, run_cfg, overrides = run_record(ckpt)
    data = run_cfg.get("data") if isinstance(run_cfg.get("data"), dict) else {}
    corpus = str(data.get("name") or "not recorded")
    if data.get("path") and "${" not in str(data["path"]):
        corpus += f" (`{data['path']}`)"
    unit = unit_label(config["unit"])
    rows = [("model", f"`{config['model_name']}` (`{config['class']}`)"), ("parameters", f"{config['params']:,}"),
            ("vocabulary", f"{config['vocab_size']} symbols, unit `{config['unit']}`"), ("corpus", corpus)]
    loss = results.get("best_val_loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        protocol = (results.get("protocol") or {}).get("text", "protocol not recorded")
        part = " (partial: not the whole split)" if results.get("partial") else ""
        rows.append(("yardstick (val)", f"{loss:.4f} nats, {loss / math.log(2):.4f} {unit}{part}: {protocol}"))
        if results.get("steps") is not None:
            rows.append(("trained", f"{results['steps']:,} steps"))
    else:
        rows.append(("yardstick (val)", f"not recorded for this checkpoint: `python -m charlm.evaluate "
                                        f"ckpt_path={out}` measures it"))
    lines = [f"# {config['model_name']}: a character-level language model trained with charlm", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             f"Exported by `{shlex.join(['python', '-m', 'charlm.export', f'ckpt_path={ckpt}', f'out={out}'])}`."]
    if overrides:
        lines.append(f"Trained by `{shlex.join(['python', '-m', 'charlm.train', *overrides])}`.")
    lines += ["", "## Files", "",
              "- `model.safetensors`: the weights (tensors only)",
              "- `config.json`: the model's class and constructor arguments (`vocab_size` is the vocabulary's size)",
              "- `vocab.json`: the symbols; id i is the i-th of `chars`",
              "", "## Use", "",
              f"`python -m charlm.sample ckpt_path={shlex.quote(str(out))} prompt=ROMEO:` (also `charlm.evaluate` "
              "and `charlm.explain`), or torch + safetensors + the class alone: charlm's docs/export.md.", ""]
    return "\n".join(lines)


def export(ckpt_path, out) -> Path:
    """Write the folder `out` for the checkpoint (or exported folder) `ckpt_path`; return it."""
    from safetensors.torch import save_model

    ckpt, out = Path(str(ckpt_path)), Path(str(out))
    check_out(out)
    model, vocab, hp = load_model(ckpt)  # its config checked: an export never builds what a checkpoint names
    config = model_config(model, vocab, hp)
    card = model_card(config, ckpt, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"}, force_contiguous=True)
        write_json(tmp / "config.json", config)
        write_json(tmp / "vocab.json", vocab.to_dict())
        (tmp / "README.md").write_text(card, encoding="utf-8")
        umask = os.umask(0o022)
        os.umask(umask)
        for f in tmp.iterdir():  # temp files are private (0600); the folder is meant to be shared
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.is_dir():
            out.rmdir()  # empty (checked): replaced by the finished folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _job(cfg: DictConfig) -> None:
    out = export(cfg.ckpt_path, cfg.out)
    print(f"wrote {out}: model.safetensors, config.json, vocab.json, README.md")


def main() -> None:
    hydra_main("export", _job, check=check)


if __name__ == "__main__":
    main()
