"""A checkpoint is data, never code: the configs inside it build only classes charlm registers (or that the
user's own config names), from plain values; anything else is one line, exit status 2, nothing written."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml
from conftest import ROOT, TINY, run_cli, run_main

from charlm.checkpoint import check_section, load_model, save_model
from charlm.data.vocab import CharVocab
from charlm.errors import CheckpointError, ConfigError
from charlm.models.contract import build_model
from charlm.studies.gradflow import model_config
from charlm.training.module import CharLM

PRECIOUS = b"precious\n"
EXTERNAL = ROOT / "tests" / "external"
LSTM = {"_target_": "charlm.models.rnn.RNNLM", "cell": "lstm", "embed_dim": 8, "hidden_dim": 16, "num_layers": 1,
        "dropout": 0.0, "forget_bias": 1.0, "tie_weights": False}


def nested_attack(victim) -> dict:
    """The crafted checkpoint's model config: a nested `_target_` that truncates `victim` when built."""
    opened = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    return {**LSTM, "forget_bias": {"_target_": "builtins.len", "_args_": [
        {"_target_": "builtins.str", "_args_": [opened]}]}}


def top_attack(victim) -> dict:
    """A top-level `_target_` that overwrites `victim` (named *.npz) when built with `vocab_size=`."""
    return {"_target_": "numpy.savez", "file": str(victim)}


ATTACKS = {"nested": (nested_attack, "victim.txt"), "top": (top_attack, "victim.npz")}


@pytest.fixture
def crafted(tmp_path):
    """attack -> (crafted checkpoint, the file it would overwrite), made from a real checkpoint."""
    vocab = CharVocab.from_text("abcdefgh \n")
    torch.manual_seed(0)
    good = save_model(tmp_path / "good.ckpt", build_model(LSTM, len(vocab)), LSTM, vocab, "lstm")
    out = {}
    for name, (attack, victim_name) in ATTACKS.items():
        victim = tmp_path / victim_name
        victim.write_bytes(PRECIOUS)
        ckpt = torch.load(good, weights_only=True)
        ckpt["hyper_parameters"]["model"] = attack(victim)
        torch.save(ckpt, tmp_path / f"{name}.ckpt")
        out[name] = (tmp_path / f"{name}.ckpt", victim)
    return out


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


COMMANDS = {
    "sample": lambda ckpt, tmp: ("charlm.sample", f"ckpt_path={ckpt}", "n_chars=5", "seed=0"),
    "evaluate": lambda ckpt, tmp: ("charlm.evaluate", f"ckpt_path={ckpt}", f"json={tmp / 'scores.json'}"),
    "explain": lambda ckpt, tmp: ("charlm.explain", f"ckpt_path={ckpt}", "text=abc", f"out={tmp / 'page'}"),
    "resume": lambda ckpt, tmp: ("charlm.train", *TINY, f"ckpt_path={ckpt}"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_crafted_checkpoint_is_refused(crafted, tmp_path, command, attack):
    ckpt, victim = crafted[attack]
    before = listing(tmp_path)
    ran = run_main(*COMMANDS[command](ckpt, tmp_path), check=False)
    assert ran.returncode == 2, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt}: model"), ran.stderr
    assert victim.read_bytes() == PRECIOUS
    assert listing(tmp_path) == before  # nothing written: no page, no scores, no run folder


@pytest.mark.parametrize("section, cfg, message", [
    ("optim", {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": {"_target_": "os.getcwd"}},
     "optim.lr._target_: a nested _target_"),
    ("scheduler", {"_target_": "builtins.exec", "source": "1"}, "scheduler._target_=builtins.exec: not a scheduler"),
])
def test_resume_checks_optim_and_scheduler(crafted, tmp_path, section, cfg, message):
    """A resumed checkpoint's optimizer and schedule configs are checked as its model's is."""
    ckpt = torch.load(tmp_path / "good.ckpt", weights_only=True)
    ckpt["hyper_parameters"][section] = cfg
    torch.save(ckpt, tmp_path / "resume.ckpt")
    before = listing(tmp_path)
    ran = run_main("charlm.train", *TINY, f"ckpt_path={tmp_path / 'resume.ckpt'}", check=False)
    assert ran.returncode == 2 and ran.stderr.strip() == f"error: {tmp_path / 'resume.ckpt'}: {message}" + (
        " charlm registers (conf/scheduler/*.yaml or a charlm.training.schedule function); "
        "for a class of your own, name its "
        "config folder: 'hydra.searchpath=[file://DIR]' with DIR/scheduler/NAME.yaml" if section == "scheduler"
        else "; a config read from a file is data and names no code to run")
    assert listing(tmp_path) == before


def test_crafted_checkpoint_end_to_end(crafted):
    """The real command, in a fresh interpreter: one line, no traceback, exit status 2, the file intact."""
    ckpt, victim = crafted["nested"]
    proc = run_cli("charlm.sample", f"ckpt_path={ckpt}", "n_chars=5", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {ckpt}: model.forget_bias._target_: a nested _target_; a config read "
                                   "from a file is data and names no code to run")
    assert victim.read_bytes() == PRECIOUS


def test_load_from_checkpoint_is_checked_too(crafted, tmp_path):
    ckpt, victim = crafted["nested"]
    with pytest.raises(CheckpointError, match="nested _target_"):
        CharLM.load_from_checkpoint(ckpt)
    assert victim.read_bytes() == PRECIOUS
    hp = {"model": LSTM, "vocab": {"chars": "abc", "unit": "char"}, "model_name": "lstm"}
    torch.save({"state_dict": CharLM(**hp).state_dict(), "hyper_parameters": hp}, tmp_path / "module.ckpt")
    module = CharLM.load_from_checkpoint(tmp_path / "module.ckpt")
    assert type(module.model).__name__ == "RNNLM" and not module.training


# ---- the check itself -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
def test_every_registered_model_config_passes(name):
    cfg = model_config(name, 16)  # as composed for training, and so as a checkpoint holds it
    assert check_section("model", cfg, "x.ckpt") is cfg


def test_a_foreign_target_is_refused_before_it_is_imported(tmp_path, monkeypatch):
    (tmp_path / "probe_on_import.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"model._target_=probe_on_import.Model: not a model charlm registers"):
        check_section("model", {"_target_": "probe_on_import.Model"}, "x.ckpt")
    assert "probe_on_import" not in sys.modules and not (tmp_path / "imported").exists()


@pytest.mark.parametrize("section, target", [
    ("model", "charlm.models.rnn.torch"),         # a module reached through charlm's namespace
    ("model", "charlm.models.rnn.nn.Module"),     # a class, but not one charlm defines
    ("model", "charlm.models.native.ctypes"),
    ("model", "os.system"),
    ("optim", "torch.optim.lr_scheduler"),        # a module, not an optimizer
    ("optim", "torch.load"),
    ("scheduler", "charlm.training.schedule.math"),        # a module imported there
    ("scheduler", "builtins.eval"),
])
def test_targets_outside_the_allowlist(section, target):
    with pytest.raises(CheckpointError, match=f"{section}._target_="):
        check_section(section, {"_target_": target}, "x.ckpt")


def test_optimizers_and_schedules_charlm_names_pass():
    assert check_section("optim", {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}, "x")
    assert check_section("optim", {"_target_": "torch.optim.AdamW", "_partial_": True, "betas": [0.9, 0.99]}, "x")
    assert check_section("scheduler", {"_target_": "charlm.training.schedule.warmup_cosine", "warmup_steps": 3}, "x")


@pytest.mark.parametrize("cfg, message", [
    ({**LSTM, "dropout": {"p": [1, {"_target_": "os.getcwd"}]}}, r"model.dropout.p\[1\]._target_: a nested _target_"),
    ({**LSTM, "_args_": [1]}, "model._args_: the Hydra key _args_"),
    ({**LSTM, "_partial_": True}, "model._partial_: the Hydra key _partial_"),
    ({**LSTM, "cell": "${oc.env:HOME}"}, "model.cell='\\$\\{oc.env:HOME\\}': an interpolation"),
    ({**LSTM, "hidden_dim": "abc"}, "model.hidden_dim=abc: expected an integer"),
    ({**LSTM, "cell": "lstmx"}, "model.cell=lstmx: must be one of"),
    ({**LSTM, "hidden_dim": torch.ones(2)}, "model.hidden_dim: a Tensor, not a plain value"),
    ({"cell": "lstm"}, "model: not a config naming its class"),
])
def test_plain_values_of_the_declared_types(cfg, message):
    with pytest.raises(CheckpointError, match=f"^x.ckpt: {message}"):
        check_section("model", cfg, "x.ckpt")


def test_build_model_builds_no_nested_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    with pytest.raises(ConfigError, match="model.forget_bias._target_"):
        build_model(nested_attack(victim), 10)
    assert victim.read_bytes() == PRECIOUS


def test_an_outside_model_is_trusted_when_its_config_is_named(tmp_path, monkeypatch):
    """tests/external's model: refused from its checkpoint alone, loaded once the command names its config
    folder (hydra.searchpath), or a caller names its class."""
    monkeypatch.syspath_prepend(str(EXTERNAL))
    cfg = yaml.safe_load((EXTERNAL / "conf" / "model" / "bag_of_chars.yaml").read_text())
    vocab = CharVocab.from_text("abcdefgh \n")
    ckpt = save_model(tmp_path / "bag.ckpt", build_model(cfg, len(vocab)), cfg, vocab, "bag_of_chars")
    alone = run_main("charlm.sample", f"ckpt_path={ckpt}", "n_chars=5", check=False)
    assert alone.returncode == 2 and "model._target_=bag_of_chars.BagOfChars: not a model" in alone.stderr
    named = run_main("charlm.sample", f"ckpt_path={ckpt}", "n_chars=5", "seed=0",
                     f"hydra.searchpath=[file://{EXTERNAL / 'conf'}]")
    assert len(named.stdout.strip()) >= 5
    model, _, _ = load_model(ckpt, trusted=["bag_of_chars.BagOfChars"])
    assert type(model).__name__ == "BagOfChars"
