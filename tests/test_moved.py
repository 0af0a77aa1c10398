"""Modules moved into data/, training/ and scoring/ still import by their old paths (charlm.MOVED), as the same
module objects, so older scripts and the optimizer/scheduler targets in older checkpoints keep working."""

from __future__ import annotations

import importlib

import pytest
from hydra.utils import get_method

import charlm

OLD_TO_NEW = [("charlm.corpus", "charlm.data.corpus"), ("charlm.vocab", "charlm.data.vocab"),
              ("charlm.module", "charlm.training.module"), ("charlm.schedule", "charlm.training.schedule"),
              ("charlm.leaderboard", "charlm.scoring.leaderboard"), ("charlm.rundir", "charlm.training.rundir")]


@pytest.mark.parametrize(("old", "new"), OLD_TO_NEW)
def test_an_old_path_is_the_moved_module(old, new):
    assert charlm.MOVED[old] == new
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_from_imports_and_targets_resolve():
    from charlm.callbacks import BestCheckpoint

    from charlm.data import CharDataModule
    from charlm.training.callbacks import BestCheckpoint as New

    assert BestCheckpoint is New and CharDataModule.__module__ == "charlm.data.datamodule"
    assert get_method("charlm.schedule.warmup_cosine") is get_method("charlm.training.schedule.warmup_cosine")


def test_a_name_never_moved_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("charlm.no_such_module")
