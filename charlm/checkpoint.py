"""Checkpoints: atomic writes, and safe loads (`weights_only=True`) with clear errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A file that cannot be used as a charlm checkpoint."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temp file in the same folder, fsync, then `os.replace`: a crash never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_checkpoint(path, map_location=map_location or "cpu")


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


def load_charlm(path, map_location="cpu"):
    """Rebuild a CharLM (model + vocab) from a checkpoint, on CPU by default."""
    from charlm.module import CharLM

    ckpt = read_checkpoint(path, map_location)
    module = CharLM(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
