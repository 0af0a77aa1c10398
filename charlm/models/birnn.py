"""BiRNNLM: a bidirectional LM in the ELMo sense, two one-way stacks that never read each other's states."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from charlm.errors import SampleArgError
from charlm.models.rnn import RecurrentLM, init_forget_bias, torch_stack


class BiRNNLM(RecurrentLM):
    """A forward stack predicts x[t+1] from x[..t]; a backward stack predicts x[t-1] from x[t..].

    The two share the embedding and the output layer only, so neither direction can read the
    character it predicts. `forward` is the forward direction alone (the shell's `rnn`; state:
    that stack's h or (h, c)), so training, chunking, causality and sampling work as for any
    left-to-right model; `aux_losses` adds the backward direction's loss to training, and
    `infill` uses both.
    """

    preferred_sampling = "random"  # the backward direction cannot carry state forward in time

    def __init__(
        self,
        vocab_size: int,
        cell: Literal["rnn", "lstm", "gru"] = "lstm",
        embed_dim: int = 64,
        hidden_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        forget_bias: float = 0.0,
    ):
        stack = torch_stack(cell, embed_dim, hidden_dim, num_layers, dropout)
        super().__init__(vocab_size, cell, stack, embed_dim, hidden_dim, dropout, forget_bias, tie_weights=False)
        self.bwd = stack()
        if cell == "lstm" and forget_bias:
            init_forget_bias(self.bwd, forget_bias)

    def backward_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, V): position t predicts idx[t-1] from idx[t:] (position 0 predicts what came before)."""
        x = self.embed(idx.flip(1))           # (B, T, E), last character first
        out, _ = self.bwd(x)                  # (B, T, H)
        return self.head(self.drop(out)).flip(1)  # (B, T, V), back in text order

    def aux_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backward direction's mean cross-entropy over the T characters of idx, each from what follows it.

        targets is idx shifted left by one, so [idx[0], targets...] is the whole window of T+1
        characters; reading it right to left, position t (1..T) predicts idx[t-1].
        """
        seq = torch.cat([idx[:, :1], targets], 1)                 # (B, T+1)
        logits = self.backward_logits(seq)[:, 1:]                  # (B, T, V)
        return {"bwd_loss": F.cross_entropy(logits.float().flatten(0, 1), idx.flatten())}

    @torch.no_grad()
    def infill(self, vocab, text: str, mask: str = "_", unknown: str = "error") -> str:
        """`text` with each `mask` character replaced by argmax_c log p_fwd(c | left) + log p_bwd(c | right).

        Masks are filled left to right, so a filled character is left context for later masks.
        The right context runs up to the next mask (what lies beyond it is not known yet); an
        empty side adds no term; with both sides empty, the forward direction starts after a
        newline, as `generate` does. Characters outside the vocabulary follow `unknown`.
        """
        if len(mask) != 1:
            raise SampleArgError(f"mask_char={mask!r}: must be a single character")
        if mask not in text:
            raise SampleArgError(f"infill text has no {mask!r}: mark each character to fill with {mask!r}")
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        pieces = text.split(mask)                           # the known text between masks
        ids = [vocab.encode(p, unknown) for p in pieces]    # may raise UnknownCharError
        state, last = None, None                            # forward direction, carried along the text
        if ids[0]:
            logits, state = self(torch.tensor([ids[0]], device=device))                   # (1, L, V)
            last = logits[0, -1]
        fills = []
        for right in ids[1:]:
            score = torch.zeros(len(vocab), device=device)  # (V,)
            if last is None and not right:  # nothing on either side: start after a newline
                logits, _ = self(torch.tensor([[vocab.stoi.get("\n", 0)]], device=device))
                last = logits[0, -1]
            if last is not None:
                score += F.log_softmax(last.float(), -1)
            if right:
                logits = self.backward_logits(torch.tensor([right], device=device))       # (1, R, V)
                score += F.log_softmax(logits[0, 0].float(), -1)
            c = int(score.argmax())
            fills.append(vocab.chars[c])
            logits, state = self(torch.tensor([[c] + right], device=device), state)      # (1, 1+R, V)
            last = logits[0, -1]
        self.train(was_training)
        out = pieces[0]
        for fill, piece in zip(fills, pieces[1:]):
            out += fill + piece
        return out
