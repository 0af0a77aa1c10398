"""CharLM: the LightningModule that trains any model of the one interface on next-character prediction.

Nothing in this file knows which architecture it trains: it sees `logits, state = model(idx, state)`.
A model may add `aux_losses(idx, targets) -> {name: loss}` (the bidirectional LM's backward
direction does); they are added to the training loss and logged under their names.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.utils._pytree import tree_map

from charlm.vocab import CharVocab


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient."""


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1):
    """Linear warmup then cosine decay to `min_lr_ratio * lr`, from torch's own schedulers."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    base_lr = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=base_lr * min_lr_ratio)
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def _detach(state):
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, state)


class CharLM(L.LightningModule):
    """Next-character cross-entropy, clipping with statistics, full val passes, samples at each validation.

    All arguments are plain data (they are saved in the checkpoint and rebuild the model with
    `CharLM.load_from_checkpoint(path)`, which needs no data folder).
    """

    def __init__(
        self,
        model: dict,
        vocab: dict,
        model_name: str = "model",
        optim: dict | None = None,
        scheduler: dict | None = None,
        clip: dict | None = None,
        carry_state: bool = False,
        sample: dict | None = None,
        divergence_factor: float | None = 10.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # one path for random windows and truncated BPTT streams
        self.vocab = CharVocab.from_dict(vocab)
        self.model = instantiate(model, vocab_size=len(self.vocab), _convert_="all")
        self.clip = {"algorithm": "norm", "value": 1.0, **(clip or {})}
        self.carry_state = carry_state
        self._state = None  # carried across batches in stream mode
        self._bad_step = None
        # a train loss above this is divergence even while finite (a uniform guess scores ln V)
        self.max_loss = divergence_factor * math.log(len(self.vocab)) if divergence_factor else math.inf
        self.register_buffer("clip_count", torch.zeros((), dtype=torch.long), persistent=True)
        self.samples: list[list] = []

    def forward(self, idx, state=None):
        return self.model(idx, state)

    # ---- training -------------------------------------------------------------------------

    def _loss(self, logits, y):
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # (B*T, V) vs (B*T,)

    def training_step(self, batch, batch_idx):
        x, y, *rest = batch
        state = None
        if self.carry_state and not (rest and rest[0]):  # rest[0]: a Python bool, no host sync
            state = self._state
        logits, state = self.model(x, state)
        loss = self._loss(logits, y)
        total = loss
        aux_losses = getattr(self.model, "aux_losses", None)
        aux = aux_losses(x, y) if aux_losses is not None else {}
        for v in aux.values():
            total = total + v
        self._flag_nonfinite(loss, self.max_loss)

        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        opt.step()  # clipping and its statistics happen in on_before_optimizer_step
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        if self.carry_state:
            self._state = _detach(state)  # truncated BPTT: gradient stops at the chunk boundary

        if self._log_now():
            self.log("train/loss", loss)
            self.log("loss", loss, prog_bar=True, logger=False)  # the bar's copy
            for name, v in aux.items():
                self.log(f"train/{name}", v)
        return loss

    def _log_now(self) -> bool:
        """True on the steps whose metrics Lightning writes (every `log_every_n_steps`). Logging only
        then saves the per-call cost of `self.log` and the progress bar's host sync on other steps."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip (grads are already unscaled here under AMP) and log the pre-clip global norm."""
        params = [p for p in self.parameters() if p.grad is not None]
        value = float(self.clip["value"] or 0.0)
        if self.clip["algorithm"] == "value":
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if value > 0:
                torch.nn.utils.clip_grad_value_(params, value)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, value if value > 0 else math.inf)
        clipped = (norm > value) if value > 0 else torch.zeros((), dtype=torch.bool, device=norm.device)
        self.clip_count += clipped.long()
        if not self._uses_grad_scaler():
            self._flag_nonfinite(norm)
        if self._log_now():  # the running fraction counts every step; only the writing is periodic
            self.log("train/grad_norm", norm)
            self.log("train/clipped", clipped.float())
            self.log("train/clip_frac", self.clip_count.float() / (self.trainer.global_step + 1))

    def _uses_grad_scaler(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def _flag_nonfinite(self, value: torch.Tensor, limit: float = math.inf) -> None:
        """Record (without a host sync) the first step whose loss or gradient was not finite (or above `limit`)."""
        if self._bad_step is None:
            return
        v = value.detach()
        bad = ~(torch.isfinite(v) & (v <= limit)) & (self._bad_step < 0)
        self._bad_step = torch.where(bad, torch.full_like(self._bad_step, self.trainer.global_step), self._bad_step)

    def check_finite(self) -> None:
        """Stop with a clear message if a non-finite loss or gradient was seen (one host sync)."""
        if self._bad_step is not None and (s := int(self._bad_step)) >= 0:
            limit = f", or loss above {self.max_loss:.3g} nats" if math.isfinite(self.max_loss) else ""
            raise DivergenceError(
                f"training diverged at step {s} (loss or gradient not finite{limit}): stopped before saving "
                "(the last good checkpoint is untouched); lower optim.lr or tighten clip.value"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = 1 if self.device.type == "cpu" else self.trainer.log_every_n_steps
        if (self.trainer.global_step % every) == 0:
            self.check_finite()

    # ---- validation -----------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self.check_finite()  # never validate (and so checkpoint) diverged weights
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_state = None
        self._aux_sums: dict[str, torch.Tensor] = {}

    def validation_step(self, batch, batch_idx):
        x, y, *rest = batch
        state = None
        if self.carry_state and not (rest and rest[0]):
            state = self._val_state  # stream evaluation: all the context before each character
        logits, state = self.model(x, state)
        self._val_state = state if self.carry_state else None
        self._val_sum += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        self._val_count += y.numel()
        aux_losses = getattr(self.model, "aux_losses", None)
        if aux_losses is not None:
            for name, v in aux_losses(x, y).items():
                self._aux_sums[name] = self._aux_sums.get(name, 0) + v.double() * y.numel()

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        loss = (total / count).float()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/bpc", loss / math.log(2), sync_dist=False)
        self.log("val/ppl", torch.exp(loss), sync_dist=False)
        for name, s in self._aux_sums.items():
            v = (self.trainer.strategy.reduce(s, reduce_op="sum") / count).float()
            self.log(f"val/{name}", v, sync_dist=False)
            self.log(f"val/{name.replace('loss', 'bpc')}", v / math.log(2), sync_dist=False)
        if not self.trainer.sanity_checking:
            self._log_sample()

    def _log_sample(self) -> None:
        """Generate a short sample and log it (a growing W&B table when W&B is the logger)."""
        from charlm.sample import generate

        cfg = {"prompt": "\n", "n_chars": 200, "temperature": 0.8, **(self.hparams.sample or {})}
        if cfg["n_chars"] <= 0 or self.trainer.global_rank != 0:
            return
        g = torch.Generator(device="cpu").manual_seed(0)
        text = generate(self.model, self.vocab, cfg["prompt"], cfg["n_chars"], cfg["temperature"], generator=g,
                        unknown="skip")[0]
        self.samples.append([self.trainer.global_step, text])
        for logger in self.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key="samples", columns=["step", "text"], data=self.samples)

    # ---- optimizer ------------------------------------------------------------------------

    def configure_optimizers(self):
        optim = dict(self.hparams.optim or {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-3})
        wd = optim.pop("weight_decay", 0.0)
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = instantiate(optim, _convert_="all")(groups)
        if not self.hparams.scheduler:
            return optimizer
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 10_000
        scheduler = instantiate(dict(self.hparams.scheduler), _convert_="all")(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoint -----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Strip torch.compile's prefix; store what exact resume needs as tensors and plain data
        (RNG states, the carried stream state, the W&B run id), so `weights_only` loading works."""
        sd = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
        checkpoint["rng"] = rng_state()
        if self.carry_state and self._state is not None:
            checkpoint["carried_state"] = self._state
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                checkpoint["wandb_id"] = logger.version

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.carry_state and "carried_state" in checkpoint:
            self._state = checkpoint["carried_state"]
        self._resume_rng = checkpoint.get("rng")

    def on_train_start(self) -> None:
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        if self.carry_state and self._state is not None:
            self._state = tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t, self._state)
        if getattr(self, "_resume_rng", None) is not None:
            set_rng_state(self._resume_rng)  # dropout masks continue exactly where the saved run was
            self._resume_rng = None


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and plain data."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x
