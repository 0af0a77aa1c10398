"""CharLM: the LightningModule that trains any model of the one interface on next-character prediction.

Nothing in this file knows which architecture it trains: it sees `logits, state = model(idx, state)`
and the optional parts of the contract through `capabilities(model)` (auxiliary losses are added to
the training loss and logged under their names). Validation is the yardstick (`charlm.yardstick`):
every character scored once, the state carried between batches unless a batch says `reset`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils._pytree import tree_map

from charlm.checkpoint import check_hparams, read_checkpoint
from charlm.data.vocab import CharVocab
from charlm.errors import DivergenceError
from charlm.generate import generate, readable
from charlm.models.contract import build_model, capabilities
from charlm.rng import StepDraws, rng_state, set_rng_state
from charlm.training.budget import BudgetClock
from charlm.training.fastpath import FastPathModule, store_signature
from charlm.yardstick import IGNORE


def _detach(state):
    if isinstance(state, torch.Tensor):  # most carried states are one tensor: no pytree walk (~3 us less)
        return state.detach()
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, state)


class CharLM(FastPathModule):
    """Next-character cross-entropy, clipping with statistics, full val passes, samples at each validation.

    All arguments are plain data (they are saved in the checkpoint and rebuild the model with
    `CharLM.load_from_checkpoint(path)`, which needs no data folder and checks them: `load_charlm`).
    """

    # the run's one clock, handed over by charlm.training.build; None (a bare Trainer): step / max_steps
    budget_clock: BudgetClock | None = None

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
        state_reset: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # one path for random windows and truncated BPTT streams
        self.vocab = CharVocab.from_dict(vocab)
        self.model = build_model(model, len(self.vocab))
        self.caps = capabilities(self.model)
        self.clip = {"algorithm": "norm", "value": 1.0, **(clip or {})}
        self.carry_state = carry_state
        self._state = None  # carried across batches in stream mode
        self._bad_step = None
        self._logging = False  # whether this training step logs (set by training_step)
        self._train_log: dict = {}  # the logging step's training metrics, until written
        self.train_loss: float | None = None  # the training loss at the last logging step (the progress bar's)
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
        x, y, reset = batch  # reset: a Python bool (no host sync)
        step = self.global_step
        self._logging = log_now = self._log_now()  # read again by the clipping hook
        state = self._state if self.carry_state and not reset and not self.cold_starts(step) else None
        logits, state = self.model(x, state)
        loss = self._loss(logits, y)
        total = loss
        aux = self.caps.aux_losses(x, y) if self.caps.aux_losses is not None else {}
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

        if log_now:
            self._train_log["train/loss"] = loss
            for name, v in aux.items():
                self._train_log[f"train/{name}"] = v
            self._write_train_log(step)
        return loss

    training_step = store_signature(training_step)  # Lightning reads it every step (charlm.training.fastpath)

    def _log_now(self) -> bool:
        """True on the logging steps (every `log_every_n_steps`, counted before this step's optimizer
        step, as Lightning counts them)."""
        return (self.trainer.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip (grads are already unscaled here under AMP) and log the pre-clip global norm."""
        params = [p for p in self._params if p.grad is not None]  # the list is built once (on_train_start)
        value = float(self.clip["value"] or 0.0)
        if self.clip["algorithm"] == "value":
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if value > 0:
                torch.nn.utils.clip_grad_value_(params, value)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, value if value > 0 else math.inf)
        if norm.device.type == "cpu":  # no device to wait for: compare and count in Python (two tensor ops less)
            clipped = value > 0 and float(norm) > value
            if clipped:
                self.clip_count.add_(1)
        else:
            clipped = (norm > value) if value > 0 else torch.zeros((), dtype=torch.bool, device=norm.device)
            self.clip_count.add_(clipped.long())
        if not self._grad_scaler:  # with a scaler, inf gradients are the scaler's business
            self._flag_nonfinite(norm)
        if self._logging:  # written with the loss at the end of training_step
            self._train_log["train/grad_norm"] = norm
            self._train_log["train/clipped"] = clipped  # a bool on a CPU, a tensor elsewhere
            self._train_log["train/clip_frac"] = self.clip_count.float() / (self.trainer.global_step + 1)

    def _uses_grad_scaler(self) -> bool:
        plugin = self.trainer.precision_plugin
        return isinstance(plugin, MixedPrecision) and plugin.scaler is not None

    def _flag_nonfinite(self, value: torch.Tensor, limit: float = math.inf) -> None:
        """Record (without a host sync) the first step whose loss or gradient was not finite (or above `limit`)."""
        if self._bad_step is None:
            return
        v = value.detach()
        if v.device.type == "cpu":  # no device to wait for: test the number in Python (five tensor ops less)
            x = float(v)
            if not (math.isfinite(x) and x <= limit) and int(self._bad_step) < 0:
                self._bad_step.fill_(self.trainer.global_step)
            return
        bad = ~(torch.isfinite(v) & (v <= limit)) & (self._bad_step < 0)
        self._bad_step = torch.where(bad, torch.full_like(self._bad_step, self.trainer.global_step), self._bad_step)

    def check_finite(self) -> None:
        """Stop with a clear message if a non-finite loss or gradient was seen (one host sync). Under
        DDP the flag is reduced over ranks, so every rank stops at the same step with the same message."""
        if self._bad_step is None:
            return
        s = int(self._bad_step)
        if self.trainer.world_size > 1:
            if not self.trainer.strategy.reduce_boolean_decision(s >= 0, all=False):
                return
            s = s if s >= 0 else self.trainer.global_step
        if s >= 0:
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
        x, y, reset = batch  # the yardstick's batches: y is IGNORE where a position is not scored
        logits, state = self.model(x, None if reset else self._val_state)           # (B, T, V)
        self._val_state = state
        self._val_sum += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                         reduction="sum").double()
        scored = (y != IGNORE).sum()
        self._val_count += scored
        if self.caps.aux_losses is not None and bool((y != IGNORE).all()):
            for name, v in self.caps.aux_losses(x, y).items():
                self._aux_sums[name] = self._aux_sums.get(name, 0) + v.double() * scored

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        loss = (total / count.clamp(min=1)).float()
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
        cfg = {"prompt": "\n", "n_chars": 200, "temperature": 0.8, **(self.hparams.sample or {})}
        if cfg["n_chars"] <= 0 or self.trainer.global_rank != 0:
            return
        g = torch.Generator(device="cpu").manual_seed(0)
        text = readable(self.vocab, generate(self.model, self.vocab, cfg["prompt"], cfg["n_chars"], cfg["temperature"],
                                             generator=g, unknown="skip")[0])  # a byte model's bytes as UTF-8
        self.samples.append([self.trainer.global_step, text])
        for logger in self.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key="samples", columns=["step", "text"], data=self.samples)

    # ---- optimizer ------------------------------------------------------------------------

    def configure_optimizers(self):
        optim = dict(self.hparams.optim or {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-3})
        wd = optim.pop("weight_decay", 0.0)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if self.caps.decays(n, p)]      # the model declares what must not decay
        no_decay = [p for n, p in named if not self.caps.decays(n, p)]
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = instantiate(optim, _convert_="all")(groups)
        if not self.hparams.scheduler:
            return optimizer
        schedule = instantiate(dict(self.hparams.scheduler), _convert_="all")  # a ProgressSchedule
        clock = self.budget_clock
        if clock is not None and (moved := clock.resumed_progress()) is not None:
            schedule.extend(*moved)  # resumed on a longer horizon: decay from where the LR was, never up
        scheduler = schedule.lambda_lr(optimizer, clock.progress if clock is not None else self._step_progress)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _step_progress(self) -> float:
        """Progress without a clock (a bare Trainer): step / max_steps."""
        t = self._trainer
        return min(1.0, t.global_step / t.max_steps) if t is not None and t.max_steps > 0 else 0.0

    # ---- checkpoint -----------------------------------------------------------------------

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, trusted=(), **_) -> CharLM:
        """`load_charlm`: Lightning's own loader would build whatever the checkpoint's config names."""
        return load_charlm(checkpoint_path, map_location or "cpu", trusted)

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
        self._params = list(self.parameters())  # per-step work kept small: no rebuilding these each step
        self._grad_scaler = self._uses_grad_scaler()
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.cold_starts = StepDraws(self.hparams.state_reset, torch.initial_seed())  # state_reset: from (seed, step)
        if self.carry_state and self._state is not None:
            self._state = tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t, self._state)
        if getattr(self, "_resume_rng", None) is not None:
            set_rng_state(self._resume_rng)  # dropout masks continue exactly where the saved run was
            self._resume_rng = None


def load_charlm(path, map_location="cpu", trusted=()) -> CharLM:
    """Rebuild a CharLM (model + vocab) from a checkpoint, on CPU by default, in eval mode; its configs
    checked first (`charlm.checkpoint.check_hparams`; `trusted`: targets the caller vouches for)."""
    ckpt = read_checkpoint(path, map_location)
    module = CharLM(**check_hparams(ckpt["hyper_parameters"], path, trusted))
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
