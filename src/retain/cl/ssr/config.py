"""ssr's config keys: EasyCL's names and defaults, plus `ssr_num_candidates`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class SSRArguments:
    """Arguments of the ssr method (docs/methods/ssr.md)."""

    base_model_path: str | None = option(
        None,
        "The model that writes new inputs by in-context learning. None or the run's "
        "model_name_or_path: the run's model with its adapters disabled (no second copy); another path "
        "or alias loads a second model. (EasyCL requires it; here it defaults to the run's base model.)",
    )
    num_shots: int = option(
        2,
        "Real train rows of the task (>= 1, a seeded draw) in the in-context prompt when the task "
        "ends; none is kept afterwards. EasyCL's default, 2.",
    )
    generation_temperature: float = option(
        0.9, "Sampling temperature (> 0) of the new inputs (top_p 0.95, top_k 40). EasyCL's, 0.9."
    )
    n_clusters: int = option(
        20,
        "K-means clusters (>= 1) over the rows' mean last-layer hidden states; rows are taken "
        "nearest-to-centroid first, one cluster after another. EasyCL's default, 20.",
    )
    pseudo_sample_memory: int = option(
        200, "Rows (>= 0) kept per task for rehearsal. 0: nothing rehearsed. EasyCL's default, 200."
    )
    generate_for_last_task: bool = option(
        True,
        "Make rows of the run's last task too. Only a later run continuing from this one "
        "(previous_task_model) rehearses them; false saves that work when the sequence ends here.",
    )
    pseudo_samples_dir: str | None = option(
        None,
        "EasyCL's folder for the generated rows. The rows always go to <output_dir>/pseudo/; when "
        "this is set, every file is also copied there (with a dataset_info.json).",
    )
    ssr_num_candidates: int | None = option(
        None,
        "Inputs (>= 0) the base model writes per task, before refinement and selection. None: twice "
        "pseudo_sample_memory (EasyCL writes pseudo_sample_memory and so keeps them all).",
    )

    def __post_init__(self) -> None:
        if self.num_shots < 1:
            raise ConfigError("must be a positive integer", field="num_shots")
        if not math.isfinite(self.generation_temperature) or self.generation_temperature <= 0:
            raise ConfigError("must be a finite number > 0", field="generation_temperature")
        if self.n_clusters < 1:
            raise ConfigError("must be a positive integer", field="n_clusters")
        if self.pseudo_sample_memory < 0:
            raise ConfigError("must be >= 0", field="pseudo_sample_memory")
        if self.ssr_num_candidates is None:
            self.ssr_num_candidates = 2 * self.pseudo_sample_memory
        if self.ssr_num_candidates < 0:
            raise ConfigError("must be >= 0", field="ssr_num_candidates")
