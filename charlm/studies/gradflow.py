"""`python -m charlm.gradflow models=[rnn,lstm,gru,transformer] out_dir=DIR steps=N`: gradient flow over time.

For a batch, the loss at one position t is differentiated with respect to the embedding output
at every position; the norm at position t-k (lag k), averaged over the batch, shows how much
of the loss at t can reach back k characters. A vanilla RNN's curve falls off exponentially
(vanishing) or blows up (exploding); an LSTM's falls slowly; a transformer's is flat-ish.

It works for any model of the one interface (charlm.training.gradients: a hook on the token embedding the
model contract names). Models are built from conf/model/NAME.yaml through the same config
composition as charlm.train; checkpoints are rebuilt with `charlm.checkpoint.load_model`. For
`birnn` this is the forward direction, what `forward()` returns.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from charlm.atomic import write_json
from charlm.checkpoint import load_model
from charlm.cli import CONF_DIR, compose, hydra_main
from charlm.config import check_sections
from charlm.data.datamodule import CharDataModule
from charlm.errors import ConfigError
from charlm.models.contract import build_model, capabilities
from charlm.schemas import GradflowTop
from charlm.training.gradients import gradient_flow, plot_flow

# ---- the CLI ------------------------------------------------------------------------------


def model_config(name: str, seq_len: int, sizes: dict | None = None) -> dict:
    """conf/model/NAME.yaml as plain data, the transformer's window set to `seq_len`, and each key
    of `sizes` that the model has (hidden_dim, embed_dim, n_embd, n_layer, ...) replaced."""
    known = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
    if name not in known:
        raise ConfigError(f"model {name!r}: no conf/model/{name}.yaml (known: {', '.join(known)})")
    overrides = [f"model={name}", f"data.block_size={seq_len}"]
    cfg = compose("train", overrides)
    model = OmegaConf.to_container(cfg.model, resolve=True)
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
        aux = capabilities(model).aux_losses  # birnn: its backward direction trains too
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
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    sizes = OmegaConf.to_container(cfg.model, resolve=True)
    curves: dict[str, dict[str, list[float]]] = {}
    if cfg.ckpt_path:
        trained, vocab, hp = load_model(cfg.ckpt_path)
        name, model_cfg = hp.get("model_name", "model"), dict(hp["model"])
        seq_len = min(cfg.seq_len, model_cfg.get("block_size", cfg.seq_len))
        dm = CharDataModule(path=cfg.data_path, vocab=vocab, block_size=seq_len, seed=cfg.seed)
        dm.prepare()
        x, y = probe_batch(dm.splits["val"], seq_len, cfg.n_rows)
        torch.manual_seed(cfg.seed)
        fresh = build_model(model_cfg, len(vocab)).to(device)
        curves[name] = {"init": gradient_flow(fresh, x.to(device), y.to(device)),
                        "trained": gradient_flow(trained.to(device), x.to(device), y.to(device))}
        return curves
    models = [cfg.models] if isinstance(cfg.models, str) else list(cfg.models)
    dm = CharDataModule(path=cfg.data_path, block_size=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    dm.prepare()
    x, y = (b.to(device) for b in probe_batch(dm.splits["val"], cfg.seq_len, cfg.n_rows))
    for name in models:
        torch.manual_seed(cfg.seed)
        model = build_model(model_config(name, cfg.seq_len, sizes), len(dm.vocab))
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
    write_json(out_dir / "gradient_flow.json", curves)
    plt.close(plot_flow(curves, out_dir / "gradient_flow.png", title))


def _job(cfg: DictConfig) -> None:
    curves = measure(cfg)
    out = Path(cfg.out_dir)
    write(curves, out, f"Gradient flow, seq_len {cfg.seq_len}, {cfg.steps} training steps")
    print(f"gradflow: wrote {out / 'gradient_flow.png'} and {out / 'gradient_flow.json'}")


def main() -> None:
    hydra_main("gradflow", _job, check=lambda cfg: check_sections(cfg, {}, GradflowTop))


if __name__ == "__main__":
    main()
