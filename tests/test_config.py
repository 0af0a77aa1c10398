"""Every config group composes with the real train.yaml, and every model/data/logger config instantiates."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from charlm.data.datamodule import CharDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=False)


@pytest.mark.parametrize("group", ["model", "data", "trainer", "logger", "callbacks", "optim", "scheduler"])
def test_every_option_composes(group):
    assert options(group), f"conf/{group} is empty"
    for name in options(group):
        extra = ["data.path=/tmp/x.txt"] if (group, name) == ("data", "text") else []
        cfg = compose_train(f"{group}={name}", *extra)
        assert group in cfg, f"{group}={name} lost its group"


@pytest.mark.parametrize("name", options("model"))
def test_every_model_instantiates_and_runs(name):
    cfg = compose_train(f"model={name}")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = instantiate(model_cfg, vocab_size=11)
    logits, _ = model(torch.randint(0, 11, (2, 5)))
    assert logits.shape == (2, 5, 11)


def test_experiments_compose():
    for name in options("experiment"):
        cfg = compose_train(f"experiment={name}")
        assert cfg.model._target_


@pytest.mark.parametrize("name", options("data"))
def test_every_data_config_builds(name, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be: that is the question.\n" * 50)
    needs_file = name in ("text", "enwik8", "text8", "hf")  # no default corpus: the user names a file
    cfg = compose_train(f"data={name}", *([f"data.path={corpus}"] if needs_file else []))
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if "_target_" not in data or needs_file:  # synthetic tasks size their own windows
        data["block_size"] = 16
    data_cls = get_class(data.pop("_target_", "charlm.data.datamodule.CharDataModule"))
    assert issubclass(data_cls, CharDataModule)
    dm = data_cls(**data)
    dm.setup()
    x, y, *_ = next(iter(dm.train_dataloader()))
    assert x.shape == (data["batch_size"], data["block_size"]) and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("name", options("logger"))
def test_every_logger_builds(name, tmp_path, monkeypatch):
    from charlm.training.build import build_loggers

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_train(f"logger={name}")
    loggers = build_loggers(cfg, tmp_path)
    assert (not loggers) == (name == "none")
    for logger in loggers:
        logger.log_metrics({"x": 1.0}, step=0)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
