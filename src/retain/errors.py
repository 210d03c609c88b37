"""User-facing errors: one clear line, exit code 2."""

from __future__ import annotations


class RetainError(Exception):
    """A problem with the user's input (config, data, model path).

    The CLI prints `str(error)` as a single line and exits with code 2.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        where = ": ".join(part for part in (source, f"'{field}'" if field else None) if part)
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(RetainError):
    """A malformed, unknown, contradictory or out-of-range configuration value."""


class DataError(RetainError):
    """A malformed or missing dataset, registry entry or row."""


class ModelError(RetainError):
    """A missing or unreadable model."""


class TrainingError(RetainError):
    """Training cannot continue (for example a non-finite loss)."""
