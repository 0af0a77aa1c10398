"""User mistakes end in one line on stderr and a non-zero exit, not a traceback.

Set CHARLM_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import contextlib
import os
import sys

from omegaconf.errors import OmegaConfBaseException

from charlm.checkpoint import CheckpointError
from charlm.data import CorpusError
from charlm.vocab import UnknownCharError


class ConfigError(ValueError):
    """A config value that cannot work (named by its key)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from charlm.module import DivergenceError
    from charlm.sample import SampleArgError

    return (CorpusError, CheckpointError, UnknownCharError, ConfigError, SampleArgError, DivergenceError,
            OmegaConfBaseException)


@contextlib.contextmanager
def report_user_errors():
    """Turn the known user-facing errors into `error: ...` on stderr and exit status 2."""
    try:
        yield
    except user_error_types() as e:
        if os.environ.get("CHARLM_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OmegaConfBaseException):
            key = getattr(e, "full_key", None)
            msg = f"config key {key}: {msg}" if key and key not in msg else f"config: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
