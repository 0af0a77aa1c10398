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
import importlib.abc
import importlib.util
import sys

__version__ = "0.2.0"

__all__ = ["CharLM", "CharVocab", "__version__", "capabilities", "generate", "load", "load_model"]


# The public names, imported on first use so that `import charlm` stays fast (sampling needs no Lightning).
_LAZY = {
    "CharLM": ("charlm.training.module", "CharLM"),
    "load": ("charlm.training.module", "load_charlm"),
    "load_model": ("charlm.checkpoint", "load_model"),
    "generate": ("charlm.generate", "generate"),
    "CharVocab": ("charlm.data.vocab", "CharVocab"),
    "capabilities": ("charlm.models.contract", "capabilities"),
}


def __getattr__(name: str):
    """Import a public name on first use (see _LAZY)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'charlm' has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)


# Import paths from before the package had its data/, training/ and scoring/ layers, kept for one release so that
# older scripts, checkpoints' optimizer/scheduler targets and notebooks keep importing. The one list of them.
MOVED = {
    **{f"charlm.{m}": f"charlm.data.{m}" for m in ("corpus", "hf", "split", "vocab")},
    **{f"charlm.{m}": f"charlm.training.{m}"
       for m in ("module", "build", "budget", "schedule", "callbacks", "rundir", "gradients")},
    **{f"charlm.{m}": f"charlm.scoring.{m}" for m in ("leaderboard", "summary", "explain_page")},
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path (MOVED) to the module at its new place: the same module object."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())
