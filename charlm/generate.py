"""Text generation through the one model interface: read the prompt once, then step the model's state
one character at a time (never recomputing the whole context). Needs torch and the model only.

`generate` returns the continuations in the model's symbols; `samples` puts the prompt, as the model read
it, in front, and `readable` turns a byte-level model's symbols into text. `charlm.sample`, the sample at
the end of `charlm.train` and the samples logged during training all go this way.

Seeded sampling is reproducible on one device; CPU and GPU give different text for the same seed.
"""

from __future__ import annotations

import torch

from charlm.data.vocab import CharVocab
from charlm.errors import SampleArgError


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
        # keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it reaches top_p
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
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
    ids = vocab.text_ids(prompt, unknown)  # characters, or the prompt's UTF-8 bytes for a byte-level model
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


def prompt_symbols(vocab: CharVocab, prompt: str, unknown: str = "error") -> str:
    """The prompt as the model reads it, in its symbols: its characters, or in byte unit its UTF-8 bytes
    (one chr(b) each); with unknown=skip, without those outside the vocabulary."""
    return vocab.decode(vocab.text_ids(prompt, unknown))


def readable(vocab: CharVocab, symbols: str) -> str:
    """Symbols as text for a person: a byte-level model's bytes decoded as UTF-8 (invalid sequences as
    U+FFFD), characters as they are."""
    return vocab.to_bytes(symbols).decode("utf-8", errors="replace") if vocab.unit == "byte" else symbols


def samples(model, vocab: CharVocab, prompt: str, n_chars: int, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, num_samples: int = 1, generator: torch.Generator | None = None,
            unknown: str = "error") -> list[str]:
    """`num_samples` samples in the model's symbols, each the prompt as the model read it (unknown=skip: what is
    left of it) followed by `n_chars` generated symbols. `readable` makes text of them; `vocab.to_bytes` bytes."""
    texts = generate(model, vocab, prompt, n_chars, temperature, top_k, top_p, num_samples, generator, unknown)
    head = prompt_symbols(vocab, prompt, "skip")  # generate accepted the prompt: all of it, or what skip kept
    return [head + t for t in texts]
