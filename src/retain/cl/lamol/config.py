"""LAMOL's config keys: EasyCL's names and defaults, plus `lamol_gamma` (the paper's LM-loss weight)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class LamolArguments:
    """Arguments of the lamol method (docs/methods/lamol.md)."""

    lamol_gamma: float = option(
        0.25,
        "Weight (>= 0) of the generation loss: loss = L_qa + lamol_gamma * L_gen (the paper's "
        "lambda, 0.25). 0: the model does not learn to write rows (with lamol_num_samples_per_task 0, "
        "exactly seq).",
    )
    lamol_num_samples_per_task: int = option(
        200,
        "Rows (>= 0) the model writes of each earlier task before every new task; malformed and "
        "repeated ones are dropped and counted (pseudo/summary.json). EasyCL's default, 200.",
    )
    lamol_generation_temperature: float = option(
        1.0, "Sampling temperature (> 0) of the written rows (top_p 0.95, top_k 40). EasyCL's, 1.0."
    )
    lamol_show_gen: bool = option(
        False,
        "EasyCL's: mark written rows, here by '(generated) ' before their instruction in the "
        "question-answering prompt (not in the row the model learns to write).",
    )
    lamol_samples_dir: str | None = option(
        None,
        "EasyCL's folder for the written rows. The rows always go to <output_dir>/pseudo/; when "
        "this is set, every file is also copied there (with a dataset_info.json).",
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.lamol_gamma) or self.lamol_gamma < 0:
            raise ConfigError("must be a finite number >= 0", field="lamol_gamma")
        if self.lamol_num_samples_per_task < 0:
            raise ConfigError("must be >= 0", field="lamol_num_samples_per_task")
        if not math.isfinite(self.lamol_generation_temperature) or self.lamol_generation_temperature <= 0:
            raise ConfigError("must be a finite number > 0", field="lamol_generation_temperature")
