"""`option`: a config dataclass field with its default and the help text `retain keys` prints."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str) -> Any:  # noqa: A002 - the name dataclass metadata uses
    """A field whose `metadata["help"]` documents the key."""
    return field(default=default, metadata={"help": help})
