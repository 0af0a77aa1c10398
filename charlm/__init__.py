"""charlm: train, compare and understand character-level language models.

The small public API, for notebooks:

    import charlm
    module = charlm.load("outputs/.../checkpoints/best.ckpt")        # a CharLM (LightningModule)
    print(charlm.generate(module.model, module.vocab, "ROMEO:", 200)[0])
    model, vocab, hparams = charlm.load_model(path)                   # the nn.Module alone, no Lightning
    model, vocab, hparams = charlm.load_model(folder)                 # the same from a charlm.export folder
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

__all__ = ["CharLM", "CharVocab", "__version__", "capabilities", "generate", "load", "load_model"]


# The public names, imported on first use so that `import charlm` stays fast (sampling needs no Lightning).
_LAZY = {
    "CharLM": ("charlm.module", "CharLM"),
    "load": ("charlm.module", "load_charlm"),
    "load_model": ("charlm.checkpoint", "load_model"),
    "generate": ("charlm.generate", "generate"),
    "CharVocab": ("charlm.vocab", "CharVocab"),
    "capabilities": ("charlm.models.contract", "capabilities"),
}


def __getattr__(name: str):
    """Import a public name on first use (see _LAZY)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'charlm' has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
