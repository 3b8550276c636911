"""The errors of a training run: a configuration that cannot run, a diverged loss, a stop on a signal."""

from __future__ import annotations

__all__ = ["ConfigError", "NonFiniteLossError", "TrainingInterrupted"]


class ConfigError(ValueError):
    """A configuration that cannot run (unknown flow or dataset, a flow that does not fit the data, ...)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal (SIGTERM, SIGINT); the message says what was saved and how to continue.

    ``signum`` is the signal's number: the command line exits with ``128 + signum``.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
