"""User mistakes end in one line on stderr and a non-zero exit, not a traceback.

Set CHARLM_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from charlm.checkpoint import CheckpointError
from charlm.data import CorpusError
from charlm.vocab import UnknownCharError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the Hydra config groups


class ConfigError(ValueError):
    """A config value that cannot work (named by its key)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import InstantiationException

    from charlm.module import DivergenceError
    from charlm.sample import SampleArgError

    return (CorpusError, CheckpointError, UnknownCharError, ConfigError, SampleArgError, DivergenceError,
            OmegaConfBaseException, InstantiationException)


@contextlib.contextmanager
def report_user_errors():
    """Turn the known user-facing errors into `error: ...` on stderr and exit status 2."""
    try:
        yield
    except user_error_types() as e:
        if os.environ.get("CHARLM_DEBUG"):
            raise
        cause = e.__cause__ if type(e).__name__ == "InstantiationException" and e.__cause__ else e
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if isinstance(e, OmegaConfBaseException):
            key = getattr(e, "full_key", None)
            msg = f"config key {key}: {msg}" if key and key not in msg else f"config: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        if _in_multirun():
            raise  # Hydra records the failed job and the sweep goes on
        sys.exit(2)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra
        return False


def precheck_overrides(config_name: str, argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so a misspelt key or an unknown option name ends in
    one line (Hydra would print a paragraph). Multirun and hydra.* overrides are left to Hydra."""
    if any(a in ("-m", "--multirun") or a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except Exception as e:
        if os.environ.get("CHARLM_DEBUG"):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        skip = ("full_key", "object_type", "Config search path", "provider=")
        lines = [ln for ln in lines if not ln.startswith(skip)]
        msg = lines[0] if lines else type(e).__name__
        if "Available options" in str(e):
            i = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
            msg += f" (available: {', '.join(lines[i + 1:])})"
        elif msg.startswith("Could not override") and "+" in str(e):
            key = msg.split("'")[1]
            msg = f"no such config key {key!r} (check its spelling; `+{key}=...` adds a new key on purpose)"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        GlobalHydra.instance().clear()
