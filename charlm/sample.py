"""`python -m charlm.sample ckpt_path=PATH prompt="ROMEO:" n_chars=500`: generate text from a checkpoint.

Generation goes through the one model interface alone: the prompt is read once, then the model's
state is stepped one character at a time (never recomputing the whole context).
"""

from __future__ import annotations

import torch

from charlm.checkpoint import load_model
from charlm.cli import hydra_main
from charlm.config import check_sections
from charlm.errors import SampleArgError
from charlm.generate import check_args, generate
from charlm.models.contract import capabilities
from charlm.schemas import SampleTop


def _quote_free_text(argv: list[str]) -> list[str]:
    """Let `prompt=To be, or not` and `infill=...` pass through Hydra's override grammar verbatim."""
    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+") in ("prompt", "infill") and value[:1] not in ("'", '"'):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
            a = f"{key}={value}"
        out.append(a)
    return out


def run(cfg) -> None:
    check_args(cfg.n_chars, cfg.temperature, cfg.top_k, cfg.top_p, cfg.num_samples)
    model, vocab, hp = load_model(cfg.ckpt_path)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    seed = cfg.seed if cfg.seed is not None else int(torch.seed() % (2**31))
    g = torch.Generator().manual_seed(int(seed))
    prompt = str(cfg.prompt or "").replace("\\n", "\n")
    if cfg.get("infill"):
        infill = capabilities(model).infill
        if infill is None:
            name = hp.get("model_name", "this model")
            raise SampleArgError(f"infill needs a bidirectional model (model=birnn); {name} reads left to right only")
        print(infill(vocab, str(cfg.infill), mask=cfg.mask_char, unknown=cfg.unknown))
        return
    texts = generate(model, vocab, prompt, cfg.n_chars, cfg.temperature, cfg.top_k, cfg.top_p,
                     cfg.num_samples, g, cfg.unknown)
    if cfg.unknown == "skip":
        prompt = "".join(c for c in prompt if c in vocab.stoi)
    for i, t in enumerate(texts):
        if i:
            print("\n" + "-" * 40)
        print(prompt + t)


def check(cfg) -> None:
    """Types and ranges of every sampling key (charlm.config)."""
    check_sections(cfg, {}, SampleTop)


def main() -> None:
    hydra_main("sample", run, argv_hook=_quote_free_text, check=check)


if __name__ == "__main__":
    main()
