"""Config checks shared by the stacked-LoRA methods' argument dataclasses (light: no torch)."""

from __future__ import annotations

import math

from retain.errors import ConfigError


def check_weight(value: float, name: str) -> None:
    """A loss weight: finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"must be a finite number >= 0, got {value}", field=name)
