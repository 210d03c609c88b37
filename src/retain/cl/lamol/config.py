"""LAMOL's config keys: EasyCL's names and defaults, plus `lamol_gamma` (the paper's LM-loss weight) and
`lamol_sample_ratio` (the paper's count of written rows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option

#: Rows per earlier task when neither lamol_num_samples_per_task nor lamol_sample_ratio is given (EasyCL's).
DEFAULT_SAMPLES_PER_TASK = 200


@dataclass
class LamolArguments:
    """Arguments of the lamol method (docs/methods/lamol.md)."""

    lamol_gamma: float = option(
        0.25,
        "Weight (>= 0) of the generation loss: loss = L_qa + lamol_gamma * L_gen (the paper's "
        "lambda, 0.25). 0: the model does not learn to write rows (with lamol_num_samples_per_task 0, "
        "exactly seq).",
    )
    lamol_num_samples_per_task: int | None = option(
        None,
        "Rows (>= 0) the model writes of each earlier task before every new task; malformed and "
        f"repeated ones are dropped and counted (pseudo/summary.json). Default {DEFAULT_SAMPLES_PER_TASK} "
        "(EasyCL's) unless lamol_sample_ratio is set.",
    )
    lamol_sample_ratio: float | None = option(
        None,
        "The paper's count instead of lamol_num_samples_per_task: before a task of N train rows, "
        "ceil(ratio x N) rows in all, split evenly over the earlier tasks (each gets the integer "
        "share; none when there are more earlier tasks than rows). The paper reports 0.05 and 0.2. "
        "In (0, 1].",
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
        if self.lamol_sample_ratio is not None:
            if self.lamol_num_samples_per_task is not None:
                raise ConfigError(
                    "and lamol_sample_ratio both set how many rows are written: set one of them",
                    field="lamol_num_samples_per_task",
                )
            if not 0 < self.lamol_sample_ratio <= 1:
                raise ConfigError(
                    "is a share of the new task's rows: must be in (0, 1]", field="lamol_sample_ratio"
                )
        elif self.lamol_num_samples_per_task is None:
            self.lamol_num_samples_per_task = DEFAULT_SAMPLES_PER_TASK
        if self.lamol_num_samples_per_task is not None and self.lamol_num_samples_per_task < 0:
            raise ConfigError("must be >= 0", field="lamol_num_samples_per_task")
        if not math.isfinite(self.lamol_generation_temperature) or self.lamol_generation_temperature <= 0:
            raise ConfigError("must be a finite number > 0", field="lamol_generation_temperature")

    def rows_per_earlier_task(self, new_task_rows: int, earlier_tasks: int) -> int:
        """Rows written of each of `earlier_tasks` before a task with `new_task_rows` train rows."""
        if self.lamol_sample_ratio is None:
            return self.lamol_num_samples_per_task or 0
        total = math.ceil(round(self.lamol_sample_ratio * new_task_rows, 6))  # 0.7 x 100 is 70.00000000000001
        return total // earlier_tasks
