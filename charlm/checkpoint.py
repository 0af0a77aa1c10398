"""Checkpoints: safe loads (`weights_only=True`) with clear errors, and the model alone without Lightning
(sampling starts fast). Writing is atomic (`charlm.build.AtomicCheckpointIO`)."""

from __future__ import annotations

from pathlib import Path

import torch

from charlm.errors import CheckpointError


def read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint's dict, loaded with `weights_only=True`; a one-line CheckpointError otherwise."""
    p = Path(str(path))
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
    return ckpt


def load_model(path, map_location="cpu"):
    """(model in eval mode, vocab, hyper-parameters) from a checkpoint, built with Hydra's instantiate
    alone: no Lightning import, for fast sampling."""
    from charlm.models.contract import build_model
    from charlm.vocab import CharVocab

    ckpt = read_checkpoint(path, map_location)
    hp = ckpt["hyper_parameters"]
    vocab = CharVocab.from_dict(hp["vocab"])
    model = build_model(hp["model"], len(vocab))
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    return model.eval(), vocab, hp


def save_model(path, model, model_cfg: dict, vocab, name: str) -> Path:
    """A checkpoint `load_model` reads back (the model's weights, its config, the vocabulary and its name),
    without Lightning: for models built outside charlm.train (benchmarks, tests)."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"vocab": vocab.to_dict(), "model": model_cfg, "model_name": name}}, path)
    return Path(path)
