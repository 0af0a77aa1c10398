"""The Lightning fast path (charlm.training.fastpath) rests on Lightning internals: each test here reads the
installed Lightning and fails loudly when an upgrade changes what a workaround relies on."""

from __future__ import annotations

import inspect

import lightning as L
import lightning.pytorch.trainer.call as call
import pytest
from lightning.pytorch.loops import training_epoch_loop
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from charlm.training.fastpath import BATCH_HOOKS, FastPathModule, QuietProfiler, store_signature, unset_idle_hooks


def test_lightning_skips_a_callback_hook_that_is_not_callable():
    """unset_idle_hooks sets idle hooks to None; Lightning must test `callable(fn)` before calling."""
    assert "callable(fn)" in inspect.getsource(call._call_callback_hooks)


def test_lightning_sets_current_fx_name_around_each_module_hook():
    """FastPathModule.__setattr__ short-cuts `_current_fx_name`: Lightning must still be the one setting it."""
    assert "pl_module._current_fx_name = hook_name" in inspect.getsource(call._call_lightning_module_hook)
    module = FastPathModule()
    module._current_fx_name = "training_step"
    assert module._current_fx_name == "training_step" and "_current_fx_name" in vars(module)


def test_training_loop_reads_the_step_signature_and_the_stored_one_answers():
    assert "is_param_in_hook_signature" in inspect.getsource(training_epoch_loop)

    def step(self, batch, batch_idx):
        return batch

    stored = store_signature(step)
    assert stored.__signature__ == inspect.signature(step)
    assert is_param_in_hook_signature(stored, "batch_idx", min_args=2)


@pytest.mark.parametrize("hook", BATCH_HOOKS)
def test_every_batch_hook_exists_on_lightnings_callback(hook):
    assert callable(getattr(L.Callback, hook))


def test_idle_hooks_are_unset_and_overridden_ones_kept():
    class Busy(L.Callback):
        def on_train_batch_end(self, *args):
            pass

    busy, idle = Busy(), L.Callback()
    unset_idle_hooks([busy, idle])
    assert callable(busy.on_train_batch_end) and busy.on_before_backward is None
    assert all(getattr(idle, h) is None for h in BATCH_HOOKS)


def test_quiet_profiler_keeps_the_profiler_interface():
    with QuietProfiler().profile("x") as ctx:
        assert ctx is None
    assert "profile" in vars(L.pytorch.profilers.PassThroughProfiler.__mro__[1])
