"""Exceptions that carry a message fit to show a user: what is wrong, where, and what to do."""

from __future__ import annotations


class VistuneError(Exception):
    """Base class; the CLI prints these as one line, without a traceback."""


class ConfigError(VistuneError):
    """A config file, field or override is invalid."""


class RegistryKeyError(VistuneError, KeyError):
    """An unknown key in a registry (format, projector, ...); the message lists the valid keys."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataError(VistuneError):
    """A data record or file is unusable; the message names the record or file. `reason` is a short
    category under which skip-and-count reports it."""

    def __init__(self, message: str, reason: str = "bad record") -> None:
        super().__init__(message)
        self.reason = reason


class LabelError(DataError):
    """Labels for a sample could not be built so that they supervise exactly the assistant's text."""

    def __init__(self, message: str, reason: str = "labels do not match the replies") -> None:
        super().__init__(message, reason)


class CheckpointError(VistuneError):
    """A checkpoint folder is incomplete or not a vistune checkpoint."""
