"""CharLM training mechanics: truncated BPTT streams, compile-safe checkpoints, precision per model."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils._pytree import tree_leaves

from charlm.data.datamodule import CharDataModule
from charlm.training.module import CharLM

TINY_LSTM = {"_target_": "charlm.models.rnn.RNNLM", "cell": "lstm", "embed_dim": 8, "hidden_dim": 16}


def tiny_module(dm, **kw) -> CharLM:
    return CharLM(model=TINY_LSTM, vocab=dm.vocab.to_dict(), sample={"n_chars": 0}, **kw)


def fit(module, dm, steps: int):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.fixture()
def stream_dm(tmp_path):
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    dm = CharDataModule(path=str(tmp_path / "c.txt"), block_size=12, batch_size=4, sampling="stream")
    dm.setup()
    return dm


@pytest.mark.parametrize("cell", ["lstm", "gru"])  # an (h, c) tuple, one tensor
def test_stream_state_is_carried_and_detached(stream_dm, cell):
    module = CharLM(model={**TINY_LSTM, "cell": cell}, vocab=stream_dm.vocab.to_dict(), sample={"n_chars": 0},
                    carry_state=True)
    fit(module, stream_dm, steps=1)
    state = module._state
    assert state is not None, "stream mode must keep the state of batch 1"
    assert type(state) is (tuple if cell == "lstm" else torch.Tensor)
    assert not any(t.requires_grad for t in tree_leaves(state)), "carried state must be detached"
    it = iter(stream_dm.train_dataset())
    x1, _, reset1 = next(it)
    x2, y2, reset2 = next(it)
    assert bool(reset1) and not bool(reset2)
    module.model.eval()
    with torch.no_grad():
        _, s1 = module.model(x1)
        with_ctx, _ = module.model(x2, s1)
        other_x1 = (x1 + 1) % len(stream_dm.vocab)
        _, s1b = module.model(other_x1)
        with_other_ctx, _ = module.model(x2, s1b)
    assert not torch.allclose(with_ctx, with_other_ctx), "batch 2's logits must depend on batch 1's characters"


def test_gradient_stops_at_the_chunk_boundary(stream_dm):
    module = tiny_module(stream_dm, carry_state=True)
    it = iter(stream_dm.train_dataset())
    x1, _, _ = next(it)
    x2, y2, _ = next(it)
    emb1 = module.model.embed(x1).detach().requires_grad_(True)
    _, s1 = module.model.rnn(emb1)
    s1 = tuple(t.detach() for t in s1)  # what CharLM does between batches
    logits, _ = module.model(x2, s1)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y2.flatten()).backward()
    assert emb1.grad is None, "no gradient may reach the previous chunk"
    assert module.model.embed.weight.grad is not None and module.model.embed.weight.grad.abs().sum() > 0


def test_random_mode_carries_nothing(stream_dm):
    stream_dm.sampling = "random"
    module = tiny_module(stream_dm, carry_state=False)
    fit(module, stream_dm, steps=2)
    assert module._state is None


def test_compiled_model_checkpoint_loads_uncompiled(stream_dm):
    module = tiny_module(stream_dm)
    module.model = torch.compile(module.model)  # lazy: nothing is compiled until the first call
    assert any("_orig_mod." in k for k in module.state_dict())
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any("_orig_mod." in k for k in ckpt["state_dict"])
    fresh = tiny_module(stream_dm)
    fresh.load_state_dict(ckpt["state_dict"])  # strict: every key matches an uncompiled model
    for a, b in zip(fresh.model.parameters(), module.model.parameters()):
        assert torch.equal(a, b)


def test_precision_per_model_family():
    from charlm.models.birnn import BiRNNLM
    from charlm.models.gated import GatedRNNLM
    from charlm.models.rnn import RNNLM
    from charlm.models.transformer import GPT

    assert GPT.gpu_precision == "bf16-mixed"
    for cls in (RNNLM, BiRNNLM, GatedRNNLM):
        assert cls.gpu_precision in ("32-true", "16-mixed"), cls  # never bf16 autocast over cuDNN RNNs


@pytest.mark.gpu
@pytest.mark.parametrize("precision,dtype", [("32-true", torch.float32), ("16-mixed", torch.float16)])
def test_rnn_runs_in_the_claimed_dtype(precision, dtype):
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from charlm.models.rnn import RNNLM

    model = RNNLM(vocab_size=11, cell="lstm", embed_dim=8, hidden_dim=16).cuda()
    seen = []
    model.rnn.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    plugin = MixedPrecision("16-mixed", "cuda") if precision == "16-mixed" else Precision()
    with plugin.forward_context():
        model(torch.randint(0, 11, (2, 5), device="cuda"))
    assert seen == [dtype]


def test_trainer_profiles_quietly_unless_a_profiler_is_named(tmp_path):
    from conftest import TINY
    from lightning.pytorch.profilers import SimpleProfiler

    from charlm import cli
    from charlm.training.build import QuietProfiler, build

    quick = [*TINY, "sample.n_chars=0", "logger=none"]
    trainer = build(cli.compose("train", quick), tmp_path / "a", "lstm").trainer
    assert isinstance(trainer.profiler, QuietProfiler)
    first, second = trainer.profiler.profile("x"), trainer.profiler.profile("y")
    assert first is second, "one shared context, not one built per call"
    with first, second:  # nested, as Lightning's hooks are
        pass
    named = build(cli.compose("train", [*quick, "+trainer.profiler=simple"]), tmp_path / "b", "lstm").trainer
    assert type(named.profiler) is SimpleProfiler


def test_callbacks_are_called_only_for_the_batch_hooks_they_implement(tmp_path):
    """The builder unsets the per-batch hooks a callback leaves as Lightning's no-op (Lightning skips a
    hook that is not callable); the hooks a callback implements, on its class or on the instance, run."""
    from conftest import TINY
    from lightning.pytorch.callbacks import LambdaCallback

    from charlm import cli
    from charlm.training.build import build

    class Ends(L.Callback):
        ends = 0

        def on_train_batch_end(self, *args):
            self.ends += 1

    ends, backwards = Ends(), []
    lam = LambdaCallback(on_after_backward=lambda trainer, module: backwards.append(trainer.global_step))
    cfg = cli.compose("train", [*TINY, "sample.n_chars=0", "trainer.max_steps=3", "trainer.val_check_interval=3"])
    built = build(cfg, tmp_path, "lstm", extra_callbacks=[ends, lam])
    assert ends.on_before_backward is None and ends.on_train_batch_start is None
    assert lam.on_train_batch_end is None and callable(lam.on_after_backward)
    assert ends.on_validation_end is not None, "only the per-batch hooks are touched"
    built.trainer.fit(built.module, datamodule=built.dm)
    assert ends.ends == 3
    assert backwards == [0, 1, 2]


class Captured(Logger):
    """A logger that keeps what it is given: [(step, metrics)]."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "captured"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_training_metrics_reach_the_loggers_at_the_logging_steps(stream_dm):
    """Every log_every_n_steps-th step (0-based index k with (k + 1) % n == 0, Lightning's count), the
    loss, the gradient statistics and the epoch, as floats; the progress bar leads with that loss. Turning
    the loss into a float warns nothing (torch warns when a tensor still in the graph is)."""
    from charlm.training.budget import BudgetBar

    module, captured = tiny_module(stream_dm), Captured()
    trainer = L.Trainer(max_steps=7, accelerator="cpu", logger=captured, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=3,
                        callbacks=[BudgetBar(refresh_rate=1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=stream_dm)
    assert not [w for w in caught if "requires_grad" in str(w.message)]
    train = [(step, m) for step, m in captured.rows if "train/loss" in m]
    assert [step for step, _ in train] == [2, 5]
    for _, m in train:
        assert set(m) == {"train/loss", "train/grad_norm", "train/clipped", "train/clip_frac", "epoch"}
        assert all(type(v) in (float, int) for v in m.values())
        assert 0 < m["train/loss"] < 10 and m["epoch"] == 0
    shown = trainer.progress_bar_callback.get_metrics(trainer, module)
    assert shown["loss"] == train[-1][1]["train/loss"] and "train/loss" not in shown


def test_lightnings_hook_name_attribute_stays_a_plain_attribute(stream_dm):
    module = tiny_module(stream_dm)
    module._current_fx_name = "training_step"
    assert module._current_fx_name == "training_step" and vars(module)["_current_fx_name"] == "training_step"
    module._current_fx_name = None
    assert module._current_fx_name is None
    module.extra = torch.nn.Linear(2, 2)  # every other name still goes through nn.Module
    assert "extra" in module._modules and "extra" not in vars(module)


@pytest.mark.parametrize(("value", "clipped"), [(1e-6, True), (1e6, False), (0.0, False)])
def test_clipping_is_counted_and_logged(stream_dm, value, clipped):
    """clip_count counts the steps whose pre-clip gradient norm was above clip.value (every step for a
    tiny value, none for a huge one or with clipping off), and the logged clip fraction agrees."""
    module, captured = tiny_module(stream_dm, clip={"value": value}), Captured()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=captured, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=3)
    trainer.fit(module, datamodule=stream_dm)
    assert int(module.clip_count) == (6 if clipped else 0)
    metrics = [m for _, m in captured.rows if "train/clipped" in m][-1]
    assert metrics["train/clipped"] == float(clipped)
    assert metrics["train/clip_frac"] == pytest.approx(1.0 if clipped else 0.0)
    assert metrics["train/grad_norm"] > 0
