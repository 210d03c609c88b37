"""LwF's config keys: EasyCL's names and defaults (`lwf_temperature`, `lwf_alpha`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class LwFArguments:
    """Arguments of the LwF method (docs/methods/lwf.md)."""

    lwf_temperature: float = option(
        2.0, "Distillation temperature T (> 0): both distributions are softmax(logits / T)."
    )
    lwf_alpha: float = option(
        0.5,
        "Weight in [0, 1] of the distillation term: (1 - a) * CE + a * T^2 * KL(old || new) from "
        "the second task on. 0 trains exactly like seq (no teacher pass).",
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.lwf_temperature) or self.lwf_temperature <= 0:
            raise ConfigError("must be a finite number > 0", field="lwf_temperature")
        if not 0.0 <= self.lwf_alpha <= 1.0:
            raise ConfigError("must be in [0, 1]", field="lwf_alpha")
