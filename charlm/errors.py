"""Every error a user can cause, in one leaf module (it imports nothing from charlm).

Entry points turn these into one line on stderr and exit status 2 (`charlm.cli.report_user_errors`).
"""

from __future__ import annotations


class CharLMError(ValueError):
    """A mistake in what the user asked for (config, corpus, checkpoint, text): one line, exit 2."""


class ConfigError(CharLMError):
    """A config value that cannot work (named by its key)."""


class CorpusError(CharLMError):
    """The corpus cannot be used: missing, empty, binary, too short..."""


class CheckpointError(CharLMError):
    """A file that cannot be used as a charlm checkpoint."""


class UnknownCharError(CharLMError):
    """Text holds characters that the vocabulary does not know."""


class SampleArgError(CharLMError):
    """An impossible sampling argument."""


class RunDirError(CharLMError):
    """A run folder that must not be written (it holds another run)."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient (reported in one line too)."""
