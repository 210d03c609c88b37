"""pseudo_replay's config keys: EasyCL's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class PseudoReplayArguments:
    """Arguments of the pseudo_replay method (docs/methods/pseudo_replay.md)."""

    base_model_path: str | None = option(
        None,
        "The model that writes the pseudo-rows. None or the run's model_name_or_path: the run's "
        "model with its adapters disabled (no second copy); another path or alias loads a second model.",
    )
    num_samples_per_task: int = option(
        200,
        "Rows (>= 0) generated for each finished task; malformed and repeated ones are dropped and "
        "counted (pseudo/summary.json). 0: nothing replayed (exactly seq). EasyCL's default, 200.",
    )
    generation_temperature: float = option(
        1.0, "Sampling temperature (> 0) of the generation (top_p 0.95, top_k 40). EasyCL's, 1.0."
    )
    num_shots: int = option(
        5,
        "Real train rows of the task (>= 1, a seeded draw) shown in the few-shot prompt when the "
        "task ends; none is kept afterwards. EasyCL's default, 5.",
    )
    generate_for_last_task: bool = option(
        True,
        "Write rows of the run's last task too. Only a later run continuing from this one "
        "(previous_task_model) replays them; false saves that generation when the sequence ends here.",
    )
    pseudo_samples_dir: str | None = option(
        None,
        "EasyCL's folder for the generated rows. The rows always go to <output_dir>/pseudo/; when "
        "this is set, every file is also copied there (with a dataset_info.json).",
    )

    def __post_init__(self) -> None:
        if self.num_samples_per_task < 0:
            raise ConfigError("must be >= 0", field="num_samples_per_task")
        if not math.isfinite(self.generation_temperature) or self.generation_temperature <= 0:
            raise ConfigError("must be a finite number > 0", field="generation_temperature")
        if self.num_shots < 1:
            raise ConfigError("must be a positive integer", field="num_shots")
