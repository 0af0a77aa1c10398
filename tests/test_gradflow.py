"""Gradient flow (causality, vanishing) and the clipping recipes (the recall task and the report: test_recall.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_cli, run_main
from hydra.utils import instantiate
from torch import nn

from charlm.models.rnn import RNNLM
from charlm.studies.gradflow import model_config
from charlm.training.callbacks import GradFlowCallback
from charlm.training.gradients import gradient_flow, position_grad_norms

CONF = Path(__file__).resolve().parents[1] / "conf"
MODEL_NAMES = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
V = 11
TINY_SIZES = {"embed_dim": 8, "hidden_dim": 16, "n_embd": 16, "n_layer": 2, "n_head": 2, "num_layers": 2}


def tiny(name: str, seq_len: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return instantiate(model_config(name, seq_len, TINY_SIZES), vocab_size=V, _convert_="all")


# ---- gradient flow ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_gradient_reaches_the_future(name):
    """The loss at t has exactly zero gradient w.r.t. the embeddings after t: causality, via gradients."""
    model = tiny(name)
    x, y = torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))
    t = 9
    norms = position_grad_norms(model, x, y, t)  # (T,)
    assert norms.shape == (16,)
    assert torch.count_nonzero(norms[t + 1 :]) == 0, norms[t + 1 :]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradient_at_lag_zero_is_nonzero(name):
    model = tiny(name)
    x, y = torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))
    curve = gradient_flow(model, x, y)
    assert len(curve) == 16 and curve[0] > 0 and all(v >= 0 for v in curve)
    assert model.training  # restored after the measurement (it runs in eval mode)


def test_measuring_leaves_parameter_grads_alone():
    model = tiny("lstm")
    gradient_flow(model, torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8)))
    assert all(p.grad is None for p in model.parameters())


def test_vanilla_rnn_gradient_vanishes_faster_than_lstm():
    """Same small recurrent init for both: the RNN's lag-30 gradient (relative to lag 0) is
    orders of magnitude below the LSTM's, whose forget gate starts open (bias 1)."""
    T, H = 40, 32
    ratios = {}
    for cell in ("rnn", "lstm"):
        torch.manual_seed(0)
        model = RNNLM(V, cell=cell, embed_dim=16, hidden_dim=H, forget_bias=1.0)
        with torch.no_grad():
            nn.init.uniform_(model.rnn.weight_hh_l0, -0.5 / H**0.5, 0.5 / H**0.5)
        torch.manual_seed(1)
        x, y = torch.randint(0, V, (8, T)), torch.randint(0, V, (8, T))
        curve = gradient_flow(model, x, y)
        ratios[cell] = curve[30] / curve[0]
    assert ratios["rnn"] < ratios["lstm"] / 100, ratios


def test_gradflow_cli(tmp_path, trained_run):
    out = tmp_path / "gf"
    run_cli("charlm.gradflow", "models=[rnn,transformer]", "steps=2", "seq_len=12", "n_rows=4",
            "batch_size=4", "model.hidden_dim=16", "model.n_embd=16", f"out_dir={out}")
    curves = json.loads((out / "gradient_flow.json").read_text())
    assert set(curves) == {"rnn", "transformer"}
    for c in curves.values():
        assert len(c["init"]) == len(c["trained"]) == 12 and c["trained"][0] > 0
    assert (out / "gradient_flow.png").stat().st_size > 1000
    ck = tmp_path / "ck"
    run_main("charlm.gradflow", f"ckpt_path={trained_run}/checkpoints/last.ckpt", "seq_len=12", "n_rows=4",
             f"out_dir={ck}")  # the same CLI through its main() in this process
    curves = json.loads((ck / "gradient_flow.json").read_text())
    assert list(curves) == ["lstm"]  # the run's model name, from the checkpoint
    c = curves["lstm"]
    assert len(c["init"]) == len(c["trained"]) == 12 and c["init"] != c["trained"]


def test_gradflow_callback_writes_curves(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from charlm.data.datamodule import CharDataModule
    from charlm.training.module import CharLM

    monkeypatch.setenv("WANDB_MODE", "disabled")
    dm = CharDataModule(block_size=12, batch_size=4)
    dm.configure_eval(chunk=12)
    dm.prepare()
    dm.splits["val"] = dm.splits["val"][:200]
    module = CharLM(model={"_target_": "charlm.models.rnn.RNNLM", "cell": "gru", "embed_dim": 8, "hidden_dim": 16},
                    vocab=dm.vocab.to_dict(), sample={"n_chars": 0})
    cb = GradFlowCallback(every_n_val=2, n_rows=4)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(max_steps=6, val_check_interval=2, logger=logger, callbacks=[cb], accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    import wandb

    wandb.finish()
    files = sorted(p.name for p in (tmp_path / "gradflow").glob("*.json"))
    assert files == ["step_000002.json", "step_000006.json"]  # validations 1 and 3 of 3
    data = json.loads((tmp_path / "gradflow" / "step_000006.json").read_text())
    assert len(data["lag_norms"]) == 12 and data["lag_norms"][0] > 0


# ---- clipping recipes ---------------------------------------------------------------------


def test_clip_recipes_differ_only_in_clipping():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        off = compose(config_name="train", overrides=["experiment=clip_off"])
        on = compose(config_name="train", overrides=["experiment=clip_on"])
    assert off.clip.value == 0 and on.clip.value > 0
    assert off.model.nonlinearity == "relu" and off.divergence_factor is None
    off.clip.value = on.clip.value
    assert off == on
