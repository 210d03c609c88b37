"""GEM's config keys: EasyCL's switch, margin key and memory keys, plus `gem_memory_size` and `gem_batch_size`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retain.cl.listed_tasks import ListedTasksArguments
from retain.errors import ConfigError
from retain.hparams.option import option

#: Rows per earlier task when neither gem_memory_size nor EasyCL's replay_ratio is given (the GEM paper's 256).
DEFAULT_MEMORY_SIZE = 256


@dataclass
class GEMArguments(ListedTasksArguments):
    """Arguments of the GEM method (docs/methods/gem.md)."""

    gem_memory_strength: float = option(
        0.5,
        "GEM's margin (EasyCL's key and default; the original code's memory_strength): when the "
        "step's gradient conflicts with an earlier task, every dual variable is at least this, i.e. "
        "g + gem_memory_strength * sum_k g_k is projected. 0: the plain projection. Finite, >= 0.",
    )
    gem_memory_size: int | None = option(
        None,
        f"Rows kept per earlier task (a reservoir sample of its train rows). Default "
        f"{DEFAULT_MEMORY_SIZE} (the GEM paper's) unless replay_ratio is set. 0: no memory, trains "
        "exactly like seq.",
    )
    gem_batch_size: int | None = option(
        None,
        "Memory rows per earlier task and step whose mean loss gives that task's reference "
        "gradient. Default: the optimizer step's global batch (per_device_train_batch_size x "
        "gradient_accumulation_steps x processes).",
    )
    replay_ratio: float | None = option(
        None,
        "EasyCL's memory size: the share (0..1) of each earlier task's train rows kept in its "
        "memory, instead of gem_memory_size.",
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.gem_memory_strength) or self.gem_memory_strength < 0:
            raise ConfigError("must be a finite number >= 0", field="gem_memory_strength")
        if self.replay_ratio is not None:
            if self.gem_memory_size is not None:
                raise ConfigError(
                    "and replay_ratio both size the memory: set one of them", field="gem_memory_size"
                )
            if not 0 <= self.replay_ratio <= 1:
                raise ConfigError("is a share of each task's rows: must be in [0, 1]", field="replay_ratio")
        elif self.gem_memory_size is None:
            self.gem_memory_size = DEFAULT_MEMORY_SIZE
        if self.gem_memory_size is not None and self.gem_memory_size < 0:
            raise ConfigError("must be >= 0", field="gem_memory_size")
        if self.gem_batch_size is not None and self.gem_batch_size < 1:
            raise ConfigError("must be >= 1 (or unset: the step's global batch)", field="gem_batch_size")
        self.check_listed_tasks()

    def memory_size(self, task: str, num_rows: int) -> int:
        """Rows of `task` (with `num_rows` train rows) kept in its memory."""
        listed = self.listed_count(task, num_rows)
        if listed is not None:
            return listed
        if self.replay_ratio is not None:
            return int(num_rows * self.replay_ratio)
        return min(self.gem_memory_size or 0, num_rows)
