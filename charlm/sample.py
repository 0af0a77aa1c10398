"""`python -m charlm.sample ckpt_path=PATH prompt="ROMEO:" n_chars=500`: generate text from a checkpoint.

Generation goes through the one model interface alone: the prompt is read once, then the model's
state is stepped one character at a time (never recomputing the whole context).
"""

from __future__ import annotations

import sys

import torch

from charlm.vocab import CharVocab


class SampleArgError(ValueError):
    """An impossible sampling argument."""


def check_args(n_chars: int, temperature: float, top_k: int | None, top_p: float | None, num_samples: int = 1):
    """Reject impossible sampling settings with a message naming the key."""
    if n_chars < 0:
        raise SampleArgError(f"n_chars={n_chars}: must be >= 0")
    if top_k is not None and top_k < 1:
        raise SampleArgError(f"top_k={top_k}: must be >= 1 (or null for no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise SampleArgError(f"top_p={top_p}: must be in (0, 1] (or null for no limit)")
    if num_samples < 1:
        raise SampleArgError(f"num_samples={num_samples}: must be >= 1")


def pick_next(logits: torch.Tensor, temperature: float, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Choose the next id per row from (N, V) logits. temperature <= 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float().cpu() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    vocab: CharVocab,
    prompt: str,
    n_chars: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    unknown: str = "error",
) -> list[str]:
    """`num_samples` continuations of `prompt`, `n_chars` each (without the prompt)."""
    check_args(n_chars, temperature, top_k, top_p, num_samples)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = vocab.encode(prompt, unknown)
    if not ids:  # nothing to condition on: start after a newline (or the first character)
        ids = [vocab.stoi.get("\n", 0)]
    idx = torch.tensor(ids, device=device).repeat(num_samples, 1)  # (N, P)
    logits, state = model(idx)  # (N, P, V)
    out = []
    for i in range(n_chars):
        nxt = pick_next(logits[:, -1], temperature, top_k, top_p, generator).to(device)  # (N,)
        out.append(nxt)
        if i + 1 < n_chars:
            logits, state = model(nxt[:, None], state)  # (N, 1, V): one step with the carried state
    model.train(was_training)
    if not out:
        return [""] * num_samples
    rows = torch.stack(out, 1).cpu().tolist()  # (N, n_chars)
    return [vocab.decode(r) for r in rows]


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
    from charlm.checkpoint import load_charlm

    check_args(cfg.n_chars, cfg.temperature, cfg.top_k, cfg.top_p, cfg.num_samples)
    module = load_charlm(cfg.ckpt_path)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = module.model.to(device)
    seed = cfg.seed if cfg.seed is not None else int(torch.seed() % (2**31))
    g = torch.Generator().manual_seed(int(seed))
    prompt = str(cfg.prompt or "").replace("\\n", "\n")
    if cfg.get("infill"):
        infill = getattr(model, "infill", None)
        if infill is None:
            name = module.hparams.model_name
            raise SampleArgError(f"infill needs a bidirectional model (model=birnn); {name} reads left to right only")
        print(infill(module.vocab, str(cfg.infill), mask=cfg.mask_char, unknown=cfg.unknown))
        return
    texts = generate(
        model, module.vocab, prompt, cfg.n_chars, cfg.temperature, cfg.top_k, cfg.top_p,
        cfg.num_samples, g, cfg.unknown,
    )
    if cfg.unknown == "skip":
        prompt = "".join(c for c in prompt if c in module.vocab.stoi)
    for i, t in enumerate(texts):
        if i:
            print("\n" + "-" * 40)
        print(prompt + t)


def main() -> None:
    import hydra

    from charlm.errors import CONF_DIR, precheck_overrides, report_user_errors

    sys.argv = [sys.argv[0]] + _quote_free_text(sys.argv[1:])
    precheck_overrides("sample", sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
    def _main(cfg) -> None:
        with report_user_errors():
            run(cfg)

    _main()


if __name__ == "__main__":
    # run through the importable module, so exception classes are the ones charlm.errors catches
    from charlm.sample import main as _main

    _main()
