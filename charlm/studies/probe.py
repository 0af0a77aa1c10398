"""The memory-span probe and the gate measurements behind it, for any model of the one interface.

- `probe_rows` / `lag_accuracy`: recall accuracy at one lag. Each row is `prefix` characters of the
  task's stream (whole earlier episodes, distractors: the model's state is warm and busy, as in
  training), then the store token s, `lag` characters of noise and the cue "?"; the row is scored
  at its last position, the argmax over the symbols (chance: 1/n_symbols). A model with a window
  (`context_size`, the contract) sees the last `context_size` characters only: from lag
  context_size - 1 on, s has left its window.
- `span`: the longest ladder lag up to which accuracy stays at or above a threshold.
- `lstm_forget_gates`: the forget gate f_t of every nn.LSTM layer, recomputed from its weights
  (PyTorch's gate order i, f, g, o), for models whose class has no `gate_openings` hook.
- `gradient_vs_forget`: the claim that an LSTM's gradient through time follows its forget gate:
  the lag-k gradient norm against the mean product of forget gates along the cell path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from charlm.models.contract import capabilities
from charlm.studies.recall import CUE, Task
from charlm.training.gradients import position_grad_norms


def probe_rows(task: Task, lag: int, n: int, seed: int, prefix: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, prefix + lag + 2), answers (n,)): `prefix` stream characters ending in a gap, then the
    store token of S, `lag` noise characters, "?". Rows and answers depend on (seed, lag) only."""
    rng = np.random.default_rng([seed, lag, 1 << 12])
    rows, answers = [], []
    for _ in range(n):
        # whole episodes (lags up to 64), then the gap before the probe's episode; its last `prefix` chars
        head = np.concatenate([task.stream(rng, prefix, 64, per_call=8),
                               task.noise(rng, int(rng.integers(0, task.max_gap + 1)))])[-prefix:] if prefix else []
        k = int(rng.integers(0, task.n_symbols))
        body = [task.stores[k], *task.noise(rng, lag), task.vocab.stoi[CUE]]
        rows.append(np.concatenate([np.asarray(head, np.int64), np.asarray(body, np.int64)]))
        answers.append(int(task.symbols[k]))
    return torch.from_numpy(np.stack(rows)), torch.tensor(answers)   # (n, prefix+lag+2), (n,)


@torch.no_grad()
def predict_last(model: nn.Module, x: torch.Tensor, candidates: torch.Tensor, rows_per_call: int = 32) -> torch.Tensor:
    """(n,) the argmax among `candidates` ids at the last position of each row of x (n, T), in eval mode,
    the input cut to the model's window when it has one."""
    window = capabilities(model).context_size
    if window is not None:
        x = x[:, -window:]                                                # (n, min(T, W))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for rows in x.split(rows_per_call):
            logits, _ = model(rows.to(device))                            # (r, T, V)
            out.append(candidates[logits[:, -1, candidates.to(device)].argmax(-1).cpu()])
    finally:
        model.train(was_training)
    return torch.cat(out)                                                 # (n,)


def lag_accuracy(model: nn.Module, task: Task, lag: int, n: int = 256, seed: int = 0, prefix: int = 64) -> float:
    """Recall accuracy at one lag over n probe rows (see `probe_rows`)."""
    x, answers = probe_rows(task, lag, n, seed, prefix)
    return float((predict_last(model, x, torch.from_numpy(task.symbols)) == answers).float().mean())


def span(lags: list[int], accuracy: list[float], threshold: float) -> int | None:
    """The longest lag L of the (sorted) ladder with accuracy >= threshold at L and at every shorter lag;
    None when the shortest lag already fails."""
    best = None
    for lag, acc in zip(lags, accuracy):
        if not acc >= threshold:
            break
        best = lag
    return best


# ---- gates ----------------------------------------------------------------------------------


def _lstm_input(model: nn.Module, idx: torch.Tensor) -> tuple[nn.LSTM, torch.Tensor]:
    """The model's first nn.LSTM and its input on idx (B, T) -> (B, T, E), caught by a forward hook."""
    lstm = next((m for m in model.modules() if isinstance(m, nn.LSTM)), None)
    if lstm is None:
        raise TypeError(f"{type(model).__name__} has no nn.LSTM")
    if lstm.bidirectional or lstm.proj_size or not lstm.batch_first:
        raise TypeError("lstm_forget_gates: only unidirectional, batch_first nn.LSTM without projection")
    seen = []
    handle = lstm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    try:
        model(idx)
    finally:
        handle.remove()
    return lstm, seen[0]


@torch.no_grad()
def lstm_forget_gates(model: nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """Per layer of the model's nn.LSTM, the forget gate at every step from a zero state: (B, T, H) each.

    f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf), rows H..2H of PyTorch's (i, f, g, o) packing;
    h_{t-1} is the layer's own output, computed by a one-layer copy (dropout between layers is off)."""
    was_training = model.training
    model.eval()
    try:
        lstm, x = _lstm_input(model, idx)                                 # x: (B, T, E)
        H = lstm.hidden_size
        gates = []
        for k in range(lstm.num_layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}")
            layer = nn.LSTM(x.shape[-1], H, 1, bias=lstm.bias, batch_first=True).to(x.device, x.dtype)
            for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if lstm.bias else ()):
                getattr(layer, f"{name}_l0").copy_(getattr(lstm, f"{name}_l{k}"))
            out, _ = layer(x)                                             # (B, T, H)
            h_prev = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)  # (B, T, H)
            pre = x @ w_ih[H : 2 * H].T + h_prev @ w_hh[H : 2 * H].T      # (B, T, H)
            if lstm.bias:
                pre = pre + getattr(lstm, f"bias_ih_l{k}")[H : 2 * H] + getattr(lstm, f"bias_hh_l{k}")[H : 2 * H]
            gates.append(torch.sigmoid(pre))
            x = out
    finally:
        model.train(was_training)
    return gates


def forget_products(f: torch.Tensor) -> torch.Tensor:
    """(T,) at lag k, the mean over rows and units of prod_{s=T-k+1}^{T-1} f_s (f: (B, T, H)), the
    gain along the cell path from c_{T-k} to c_{T-1}; 1 at lag 0."""
    logf = f.double().clamp_min(1e-300).log().flip(1)                     # (B, T, H), lag order
    path = torch.cat([torch.zeros_like(logf[:, :1]), logf[:, :-1].cumsum(1)], 1)  # (B, T, H): lag k sums k terms
    return path.exp().mean((0, 2)).float()                                # (T,)


def gradient_vs_forget(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_lag: int | None = None) -> dict:
    """The lag-k gradient norm of the loss at the last position (x, y: (B, T)) next to the first LSTM
    layer's forget-gate product over the same path, both relative to lag 1, with the Pearson correlation
    of their logs and the per-character decay of each over lags 1..max_lag (fitted slopes in log space)."""
    grad = position_grad_norms(model, x, y).flip(0).double()              # (T,) index = lag
    prod = forget_products(lstm_forget_gates(model, x)[0]).double()       # (T,)
    K = min(max_lag or len(grad) - 1, len(grad) - 1)
    lags = torch.arange(1, K + 1, dtype=torch.float64)
    ok = (grad[1 : K + 1] > 0) & (prod[1 : K + 1] > 0)
    lg, lp, k = grad[1 : K + 1][ok].log(), prod[1 : K + 1][ok].log(), lags[ok]
    if len(k) < 3:
        return {"lags": lags.tolist(), "grad": [], "forget_product": [], "r": float("nan"),
                "grad_decay": float("nan"), "forget_decay": float("nan")}
    r = float(torch.corrcoef(torch.stack([lg, lp]))[0, 1])
    slope = lambda v: float(((k - k.mean()) * (v - v.mean())).sum() / ((k - k.mean()) ** 2).sum())  # noqa: E731
    return {"lags": list(range(K + 1)), "grad": (grad[: K + 1] / grad[1]).tolist(),
            "forget_product": (prod[: K + 1] / prod[1]).tolist(), "r": r,
            "grad_decay": math.exp(slope(lg)), "forget_decay": math.exp(slope(lp))}
