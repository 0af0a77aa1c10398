"""charlm: train, compare and understand character-level language models.

The small public API, for notebooks:

    import charlm
    module = charlm.load("outputs/.../checkpoints/best.ckpt")        # a CharLM (LightningModule)
    print(charlm.generate(module.model, module.vocab, "ROMEO:", 200)[0])
    model, vocab, hparams = charlm.load_model(path)                   # the nn.Module alone, no Lightning
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["CharLM", "CharVocab", "__version__", "capabilities", "generate", "load", "load_model"]


def __getattr__(name: str):
    """Import on first use: `import charlm` stays fast (sampling needs no Lightning)."""
    if name == "CharLM":
        from charlm.module import CharLM

        return CharLM
    if name == "load":
        from charlm.module import load_charlm

        return load_charlm
    if name == "load_model":
        from charlm.checkpoint import load_model

        return load_model
    if name == "generate":
        from charlm.generate import generate

        return generate
    if name == "CharVocab":
        from charlm.vocab import CharVocab

        return CharVocab
    if name == "capabilities":
        from charlm.models.contract import capabilities

        return capabilities
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")
