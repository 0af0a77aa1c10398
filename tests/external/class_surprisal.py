"""A study charlm has never heard of: how hard each class of character (letter, digit, space, punctuation)
is for a model, in bits per character of that class, scored as the yardstick scores (every character once,
its full context: the state carried, or the model's sliding window)."""

from __future__ import annotations

import math

import torch

from charlm.studies.context import full_context_losses


def char_class(c: str) -> str:
    """The class a character falls in."""
    return "letter" if c.isalpha() else "digit" if c.isdigit() else "space" if c.isspace() else "other"


@torch.no_grad()
def class_surprisal(model: torch.nn.Module, vocab, text: str) -> dict[str, dict]:
    """Per class of the predicted character: its bits per character and how many characters were scored."""
    ids = torch.tensor(vocab.encode(text))
    nats = full_context_losses(model.eval(), ids)               # (n - 1,): the loss of predicting ids[p + 1]
    classes = [char_class(c) for c in text[1:]]
    out = {}
    for name in sorted(set(classes)):
        mask = torch.tensor([k == name for k in classes])
        out[name] = {"bpc": nats[mask].mean().item() / math.log(2), "chars": int(mask.sum())}
    return out
