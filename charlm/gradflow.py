"""`python -m charlm.gradflow models=[rnn,lstm,gru,transformer] out_dir=DIR steps=N`: gradient flow over time.

For a batch, the loss at one position t is differentiated with respect to the embedding output
at every position; the norm at position t-k (lag k), averaged over the batch, shows how much
of the loss at t can reach back k characters. A vanilla RNN's curve falls off exponentially
(vanishing) or blows up (exploding); an LSTM's falls slowly; a transformer's is flat-ish.

It works for any model of the one interface: a forward hook on its token embedding (`embed`,
or the transformer's `wte`) swaps the embedding output for a leaf tensor, whose gradient is
taken with `torch.autograd.grad` (parameter gradients are never touched). For `birnn` this is
the forward direction, what `forward()` returns.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from charlm.errors import CONF_DIR, ConfigError, report_user_errors


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The model's token embedding: `embed` (RNN families) or `wte` (transformer)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    for name in ("embed", "wte"):
        if isinstance(getattr(model, name, None), nn.Embedding):
            return getattr(model, name)
    raise TypeError(f"{type(model).__name__} has no token embedding named `embed` or `wte`")


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
    handle = token_embedding(model).register_forward_hook(swap)
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


# ---- the Lightning callback ---------------------------------------------------------------


class GradFlowCallback(L.Callback):
    """Every `every_n_val` validations, measure the gradient flow on a fixed val batch (the first
    `n_rows` rows of the first val batch), log the curve to W&B (if a WandbLogger is attached) and
    write RUN_DIR/gradflow/step_XXXXXX.json."""

    def __init__(self, every_n_val: int = 1, n_rows: int = 16):
        self.every_n_val, self.n_rows = max(1, int(every_n_val)), n_rows
        self._batch = None
        self._seen = 0
        self.curves: dict[int, list[float]] = {}  # step -> curve

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        self._seen += 1
        if (self._seen - 1) % self.every_n_val:
            return
        if self._batch is None:
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
            x, y, *_ = next(iter(loader))
            self._batch = (x[: self.n_rows].clone(), y[: self.n_rows].clone())  # (n, T) each
        x, y = (b.to(pl_module.device) for b in self._batch)
        step = trainer.global_step
        curve = gradient_flow(pl_module.model, x, y)
        self.curves[step] = curve
        out = Path(trainer.default_root_dir) / "gradflow"
        out.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "model": pl_module.hparams.get("model_name", "model"), "lag_norms": curve}
        (out / f"step_{step:06d}.json").write_text(json.dumps(record) + "\n")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                self._log_wandb(logger, step)

    def _log_wandb(self, logger, step: int) -> None:
        import matplotlib.pyplot as plt
        import wandb

        fig = plot_flow({f"step {s}": {"trained": c} for s, c in self.curves.items()},
                        title=f"Gradient flow (step {step})")
        logger.log_metrics({"gradflow/curve": wandb.Image(fig)}, step=step)
        plt.close(fig)


# ---- the CLI ------------------------------------------------------------------------------


def model_config(name: str, seq_len: int, sizes: dict | None = None) -> dict:
    """conf/model/NAME.yaml as plain data, the transformer's window set to `seq_len`, and each key
    of `sizes` that the model has (hidden_dim, embed_dim, n_embd, n_layer, ...) replaced."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    known = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
    if name not in known:
        raise ConfigError(f"model {name!r}: no conf/model/{name}.yaml (known: {', '.join(known)})")
    overrides = [f"model={name}", f"data.block_size={seq_len}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app sharing conf/
        cfg = compose(config_name="train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("compile", None)
    for key, value in (sizes or {}).items():
        if key in model:
            model[key] = value
    return model


def train_steps(model: nn.Module, dm, steps: int, lr: float, clip: float, seed: int) -> list[float]:
    """A plain AdamW loop on random windows of `dm`'s train split, with norm clipping; the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99))
    batches = iter(dm.train_dataset())
    device = next(model.parameters()).device
    losses = []
    model.train()
    for _ in range(steps):
        x, y = (b.to(device) for b in next(batches)[:2])          # (B, T) each
        logits, _ = model(x)                                        # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        aux = getattr(model, "aux_losses", None)  # birnn: its backward direction trains too
        total = loss + sum(aux(x, y).values()) if aux is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def probe_batch(val_ids: torch.Tensor, seq_len: int, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_rows` windows of seq_len+1 characters evenly spread over the val split: (x, y), each (n, T)."""
    starts = torch.linspace(0, len(val_ids) - seq_len - 2, n_rows).long()
    w = val_ids[starts[:, None] + torch.arange(seq_len + 1)].long()  # (n, T+1)
    return w[:, :-1], w[:, 1:]


def measure(cfg: DictConfig) -> dict[str, dict[str, list[float]]]:
    """{model: {"init": curve, "trained": curve}} as cfg says (fresh models trained `steps`, or one checkpoint)."""
    from hydra.utils import instantiate

    from charlm.checkpoint import load_charlm
    from charlm.data import CharDataModule

    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    sizes = OmegaConf.to_container(cfg.model, resolve=True)
    curves: dict[str, dict[str, list[float]]] = {}
    if cfg.ckpt_path:
        module = load_charlm(cfg.ckpt_path)
        name, model_cfg = module.hparams.model_name, dict(module.hparams.model)
        seq_len = min(cfg.seq_len, model_cfg.get("block_size", cfg.seq_len))
        dm = CharDataModule(path=cfg.data_path, vocab=module.vocab, block_size=seq_len, seed=cfg.seed)
        dm.prepare()
        x, y = probe_batch(dm.splits["val"], seq_len, cfg.n_rows)
        torch.manual_seed(cfg.seed)
        fresh = instantiate(model_cfg, vocab_size=len(module.vocab), _convert_="all").to(device)
        curves[name] = {"init": gradient_flow(fresh, x.to(device), y.to(device)),
                        "trained": gradient_flow(module.model.to(device), x.to(device), y.to(device))}
        return curves
    models = [cfg.models] if isinstance(cfg.models, str) else list(cfg.models)
    dm = CharDataModule(path=cfg.data_path, block_size=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    dm.prepare()
    x, y = (b.to(device) for b in probe_batch(dm.splits["val"], cfg.seq_len, cfg.n_rows))
    for name in models:
        torch.manual_seed(cfg.seed)
        model = instantiate(model_config(name, cfg.seq_len, sizes), vocab_size=len(dm.vocab), _convert_="all")
        model = model.to(device)
        init = gradient_flow(model, x, y)
        losses = train_steps(model, dm, cfg.steps, cfg.lr, cfg.clip, cfg.seed) if cfg.steps > 0 else []
        curves[name] = {"init": init, "trained": gradient_flow(model, x, y) if losses else []}
        end = f", train loss {losses[0]:.2f} -> {losses[-1]:.2f}" if losses else ""
        print(f"gradflow: {name}: lag 0 {init[0]:.2e}, lag {len(init) - 1} {init[-1]:.2e} at init{end}")
    return curves


def write(curves: dict, out_dir: Path, title: str = "") -> None:
    """DIR/gradient_flow.json and DIR/gradient_flow.png."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gradient_flow.json").write_text(json.dumps(curves) + "\n")
    plt.close(plot_flow(curves, out_dir / "gradient_flow.png", title))


def main() -> None:
    import sys

    import hydra

    from charlm.errors import precheck_overrides

    precheck_overrides("gradflow", sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="gradflow")
    def _main(cfg: DictConfig) -> None:
        with report_user_errors():
            if cfg.seq_len < 2 or cfg.steps < 0:
                raise ConfigError(f"seq_len={cfg.seq_len}, steps={cfg.steps}: need seq_len >= 2 and steps >= 0")
            curves = measure(cfg)
            out = Path(cfg.out_dir)
            write(curves, out, f"Gradient flow, seq_len {cfg.seq_len}, {cfg.steps} training steps")
            print(f"gradflow: wrote {out / 'gradient_flow.png'} and {out / 'gradient_flow.json'}")

    _main()


if __name__ == "__main__":
    from charlm.gradflow import main as _main

    _main()
