"""The Lightning fast path: what charlm does around Lightning's per-step machinery so that a small model's
training step costs about what a bare PyTorch loop's does (`make bench`: every family within 5%).

Each piece relies on a Lightning internal; `tests/test_fastpath.py` checks each one against the installed
Lightning, so an upgrade that changes them fails loudly instead of silently slowing every step.

=========================  ===========================================  ==================================
piece                      what it does                                 what it saves (2-core CPU, measured)
=========================  ===========================================  ==================================
`FastPathModule`           `_current_fx_name`, set by Lightning ~35      ~1.3 us a set (~45 us a step)
  `.__setattr__`           times a step, bypasses nn.Module's checks
`FastPathModule`           the logging step's train/* metrics go to the  ~55 us a step (Lightning walks its
  `._write_train_log`      loggers directly, not through `self.log`      result collection every step)
`store_signature`          training_step's signature stored once         ~36 us a step (inspect rebuilt it)
`unset_idle_hooks`         callbacks' no-op batch hooks unset, so        ~8-10 us a hook, ~0.2 ms a step
                           Lightning skips them
`QuietProfiler`            one shared null context per profiled hook     ~0.8 us a hook, ~90 a step
=========================  ===========================================  ==================================
"""

from __future__ import annotations

import contextlib
import inspect

import lightning as L
import torch
from lightning.pytorch.profilers import PassThroughProfiler


class FastPathModule(L.LightningModule):
    """A LightningModule base with the per-step workarounds above; CharLM derives from it."""

    def __setattr__(self, name: str, value) -> None:
        if name == "_current_fx_name":  # Lightning sets it (a str or None) twice around each hook call, ~35 a
            object.__setattr__(self, name, value)  # step: where nn.Module's checks would put it, ~1.3 us less
            return
        super().__setattr__(name, value)

    def _write_train_log(self, step: int) -> None:
        """Write the logging step's training metrics to the loggers, as Lightning writes `self.log`'s
        (floats, with the epoch, at the step's index), and keep the loss for the progress bar.

        Through `self.log` they would stay in Lightning's result collection, which it walks at every
        step, logged or not: ~55 us a step inside a small model's run on a CPU, for four metrics."""
        # detached first: float() of a tensor still in the graph (the loss) warns
        metrics = {name: float(v.detach() if isinstance(v, torch.Tensor) else v) for name, v in self._train_log.items()}
        self._train_log.clear()
        self.train_loss = metrics["train/loss"]
        for logger in self.loggers:
            logger.log_metrics(metrics | {"epoch": self.current_epoch}, step=step)
            logger.save()


def store_signature(method):
    """`method` with its signature stored: Lightning reads training_step's at every step (whether to pass
    batch_idx), and a stored one spares inspect ~12 us of rebuilding it (~50 us inside a run)."""
    method.__signature__ = inspect.signature(method)
    return method


# The hooks Lightning calls on every callback at every training or validation batch.
BATCH_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
               "on_before_zero_grad", "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end")


def unset_idle_hooks(callbacks: list) -> None:
    """Unset the per-batch hooks a callback leaves as the base class's no-op, so Lightning skips them.

    Lightning calls each batch hook on every callback, overridden or not, and skips one that is not
    callable (`_call_callback_hooks`). Inside a training run such a no-op call costs ~8-10 us (the
    state key, the profiler's context, the call): ~35 a step with charlm's callbacks, ~0.2 ms of a
    small model's ~20 ms step on a CPU. A hook set on the instance itself is left as it is."""
    for callback in callbacks:
        for hook in BATCH_HOOKS:
            if hook not in vars(callback) and getattr(type(callback), hook) is getattr(L.Callback, hook):
                setattr(callback, hook, None)


class QuietProfiler(PassThroughProfiler):
    """Lightning's default profiler (it records nothing), without a context manager built per call.

    Lightning enters `profiler.profile(name)` around every hook it calls, about 90 times a training step
    with charlm's callbacks; the base class builds a generator-based context each time (~1 us), where one
    shared null context costs ~0.2 us. The trainer gets it unless `trainer.profiler` names another
    (`+trainer.profiler=simple` for Lightning's timing table)."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing
