"""Short trainings for the report's studies, through the builder exactly as `python -m charlm.train
OVERRIDES` would run them (same sampling, evaluation, clipping), without loggers, progress bar or kept
checkpoints."""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig

from charlm.cli import compose
from charlm.config import check_train
from charlm.training.build import build


def _compose(overrides: list[str]) -> DictConfig:
    """The train config with `overrides`, as charlm.train would compose it."""
    return compose("train", overrides)


def fit(overrides: list[str], sizes: dict, device: str, callbacks: list = (), seed: int = 1337):
    """Train through the builder exactly as `python -m charlm.train OVERRIDES` would (same sampling,
    evaluation, clipping), without loggers, progress bar or kept checkpoints. Model keys in `sizes`
    replace the model config's where it has them. Returns (module, dm, callbacks)."""
    base = [f"trainer={'gpu' if device == 'cuda' else 'cpu'}", "logger=none", "callbacks=none", f"seed={seed}",
            "++trainer.enable_progress_bar=false", "gates_every=null", "sample.n_chars=0", *overrides]
    cfg = _compose(base)
    for k, v in sizes.items():  # as `model.KEY=VALUE` overrides would, for the keys the model has
        if k in cfg.model:
            cfg.model[k] = v
    check_train(cfg)
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "model")
    with tempfile.TemporaryDirectory(prefix="charlm-report-") as run_dir:
        built = build(cfg, Path(run_dir), name, extra_callbacks=callbacks)
        built.trainer.fit(built.module, datamodule=built.dm)
    return built.module, built.dm, built.trainer.callbacks
