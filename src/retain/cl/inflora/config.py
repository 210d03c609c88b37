"""InfLoRA's config keys (EasyCL has no InfLoRA; the paper's values are in docs/methods/inflora.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class InfLoRAArguments:
    inflora_threshold: float = option(
        0.97,
        "The paper's epsilon, in [0, 1]: after each task, the stored input subspace of every "
        "target layer grows until it holds this share of the energy (squared norm) of the task's inputs "
        "to that layer. Higher protects earlier tasks more and leaves later tasks fewer directions; 0 "
        "stores nothing (no protection).",
    )
    inflora_samples: int = option(
        256,
        "Train rows (>= 1) of each task whose inputs to the target layers (every real token, "
        "prompt and answer) design the task's A before it trains and grow the subspace after it (a "
        "seeded random choice; all rows when the task has fewer).",
    )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.inflora_threshold) and 0.0 <= self.inflora_threshold <= 1.0):
            raise ConfigError(f"must be in [0, 1], got {self.inflora_threshold}", field="inflora_threshold")
        if isinstance(self.inflora_samples, bool) or self.inflora_samples < 1:
            raise ConfigError(
                f"must be a positive integer, got {self.inflora_samples}", field="inflora_samples"
            )
