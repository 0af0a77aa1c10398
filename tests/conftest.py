"""Shared test helpers: run the real CLIs in a subprocess, and one tiny trained run per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: one thread each for in-process math
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and for the CLIs they start: tiny models gain nothing from two

# Overrides that make any training run take seconds on a CPU.
TINY = [
    "trainer=cpu", "logger=none", "trainer.max_steps=12", "trainer.val_check_interval=6",
    "data.batch_size=8", "data.block_size=16", "eval.chunk=512", "eval.window_batches=2",
    "model.hidden_dim=32", "model.embed_dim=16", "sample.n_chars=20",
]

# Tiny sizes for any model: each key is used only where the model's config has it.
TINY_SIZES = {"embed_dim": 16, "hidden_dim": 32, "n_embd": 32, "n_layer": 1, "n_head": 2, "num_layers": 1,
              "state_dim": 8, "expand": 2}


def tiny_model_overrides(name: str) -> list[str]:
    """`model.KEY=VALUE` overrides that make conf/model/NAME.yaml tiny (keys it does not have are left out)."""
    from omegaconf import OmegaConf

    keys = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml").keys()
    return [f"model.{k}={v}" for k, v in TINY_SIZES.items() if k in keys]


def run_cli(module: str, *args: str, check: bool = True, timeout: float = 300, env: dict | None = None):
    """Run `python -m module args...` and return the CompletedProcess (text mode)."""
    e = dict(os.environ, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e,
    )
    if check and proc.returncode != 0:
        cmd = f"{module} {' '.join(args)}"
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class Ran:
    """What `run_main` saw: the exit status and what was printed (CompletedProcess's fields)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(module: str, *args: str, check: bool = True) -> Ran:
    """`python -m module args...` in this process: the module's own `main()` with these arguments, its exit
    status (SystemExit) and its stdout/stderr. It spares the ~5 s of a fresh interpreter importing torch; each
    CLI keeps at least one `run_cli` test that proves the one-line/no-traceback behaviour end to end."""
    import contextlib
    import importlib
    import io
    import logging

    out, err = io.StringIO(), io.StringIO()
    argv, code = sys.argv, 0
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra's job logging configures the root logger
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            importlib.import_module(module).main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
    ran = Ran(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({code}):\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}")
    return ran


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny LSTM trained through the real CLI; tests read what it wrote."""
    run_dir = tmp_path_factory.mktemp("run")
    run_cli("charlm.train", *TINY, f"hydra.run.dir={run_dir}")
    return run_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
