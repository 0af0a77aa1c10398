"""Gradient flow over time: how much of the loss at position t reaches back to the input k characters
earlier (lag k). A vanilla RNN's curve falls off exponentially (vanishing) or blows up (exploding);
an LSTM's falls slowly; a transformer's is flat-ish up to its window.

For a batch, the loss at one position t is differentiated with respect to the token-embedding
output at every position, through a forward hook on the embedding the model contract names (it
swaps the output for a leaf tensor; `torch.autograd.grad` never touches parameter gradients).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.contract import capabilities


def position_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int | None = None) -> torch.Tensor:
    """(T,) mean over the batch of ||d loss_t / d e_s|| for every position s, where loss_t is the
    cross-entropy at position t (default: the last) and e_s the embedding output at s.

    Runs in eval mode (no dropout), with cuDNN off (its RNN backward needs train mode), and
    under grad even inside Lightning's validation (inference mode).
    """
    T = x.shape[1]
    t = T - 1 if t is None else t
    leaves: list[torch.Tensor] = []

    def swap(module, inputs, out):
        leaf = out.detach().requires_grad_(True)  # (B, T, E)
        leaves.append(leaf)
        return leaf

    was_training = model.training
    handle = capabilities(model).token_embedding.register_forward_hook(swap)
    cudnn = torch.backends.cudnn.flags(enabled=False) if x.is_cuda else contextlib.nullcontext()
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad(), cudnn:
            x, y = x.clone(), y.clone()  # tensors made under inference mode cannot enter autograd
            logits, _ = model(x)                                                # (B, T, V)
            loss = F.cross_entropy(logits[:, t].float(), y[:, t], reduction="sum")  # per-row losses, summed
            (grad,) = torch.autograd.grad(loss, leaves[0])                      # (B, T, E)
        return grad.float().norm(dim=-1).mean(0).detach()                       # (T,)
    finally:
        handle.remove()
        model.train(was_training)


def gradient_flow(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Gradient norm at lag k = 0..T-1 for the loss at the last position (index k is lag k)."""
    return position_grad_norms(model, x, y).flip(0).cpu().tolist()


# ---- the figure ---------------------------------------------------------------------------


def plot_flow(curves: dict[str, dict[str, list[float]]], path: Path | None = None, title: str = ""):
    """Norm vs lag on a log axis: one colour per model, init dashed, trained solid. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, runs) in enumerate(curves.items()):
        for kind, style in (("init", "--"), ("trained", "-")):
            if runs.get(kind):
                vals = [v if v > 0 and math.isfinite(v) else float("nan") for v in runs[kind]]  # log axis: no zeros
                ax.plot(range(len(vals)), vals, style, color=f"C{i}", label=f"{name} ({kind})")
    ax.set_yscale("log")
    ax.set_xlabel("lag k (characters before the loss position)")
    ax.set_ylabel("mean ||dL_T / d emb_(T-k)||")
    ax.set_title(title or "Gradient flow over time")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
