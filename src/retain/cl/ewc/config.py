"""EWC's config keys: EasyCL's names and defaults (`ewc_lambda`, `ewc_num_samples`) plus `ewc_gamma`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class EWCArguments:
    """Arguments of the EWC method (docs/methods/ewc.md)."""

    ewc_lambda: float = option(
        10000.0,
        "Weight (>= 0) of the penalty ewc_lambda/2 * sum F (theta - theta*)^2 on the LoRA weights. "
        "EasyCL's default, 10000; 0 trains exactly like seq.",
    )
    ewc_num_samples: int = option(
        100,
        "Train rows (>= 1) of each task whose per-row squared gradients are averaged into the "
        "task's diagonal Fisher (a seeded random choice; all rows when the task has fewer).",
    )
    ewc_gamma: float = option(
        1.0,
        "Online EWC decay in [0, 1] of the Fisher of earlier tasks: F <- ewc_gamma * F + F_task "
        "after each task. 1.0: a plain sum over tasks; 0: the last task's Fisher only.",
    )

    previous_task_data: str | None = option(
        None,
        "EasyCL's: the earlier task's data to compute its Fisher on. Accepted and not used: retain "
        "computes each task's Fisher when the task ends and saves it with the task (previous_task_model).",
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.ewc_lambda) or self.ewc_lambda < 0:
            raise ConfigError("must be a finite number >= 0", field="ewc_lambda")
        if self.ewc_num_samples < 1:
            raise ConfigError("must be a positive integer", field="ewc_num_samples")
        if not 0.0 <= self.ewc_gamma <= 1.0:
            raise ConfigError("must be in [0, 1]", field="ewc_gamma")
