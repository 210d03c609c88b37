"""The `replay` method's config keys: EasyCL's names and meanings, plus retain's per-batch mixing."""

from __future__ import annotations

from dataclasses import dataclass

from retain.cl.listed_tasks import ListedTasksArguments
from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class ReplayArguments(ListedTasksArguments):
    replay_ratio: float | None = option(
        None,
        "EasyCL's meaning: the share (0..1) of each earlier task's train rows replayed with every "
        "later task. Default 0.3 (EasyCL's), unless replay_mix_ratio is set.",
    )
    replay_mix_ratio: float | None = option(
        None,
        "retain's per-batch mixing instead of EasyCL's shares: replayed rows per row of the current "
        "task (1.0: as many replayed rows as new ones), drawn from a reservoir memory of "
        "replay_buffer_size rows of all earlier tasks.",
    )
    replay_buffer_size: int = option(1000, "Rows kept in the reservoir memory (with replay_mix_ratio only).")

    def __post_init__(self) -> None:
        for name in ("replay_ratio", "replay_mix_ratio"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError("must be >= 0", field=name)
        if self.replay_buffer_size < 0:
            raise ConfigError("must be >= 0", field="replay_buffer_size")
        if self.replay_mix_ratio is not None:
            easycl = ("replay_ratio", "replay_task_list", "maxsamples_list", "previous_task_dataset")
            for name in easycl:
                if getattr(self, name) is not None:
                    raise ConfigError(
                        "is EasyCL's per-task replay; it contradicts replay_mix_ratio (retain's per-batch "
                        "mixing): set one of them",
                        field=name,
                    )
            return
        if self.replay_ratio is None:
            self.replay_ratio = 0.3
        if self.replay_ratio > 1:
            raise ConfigError(
                "is a share of each earlier task's rows: must be in [0, 1]", field="replay_ratio"
            )
        self.check_listed_tasks()

    @property
    def mixing(self) -> bool:
        """retain's per-batch mixing from a reservoir (True) or EasyCL's per-task shares (False)."""
        return self.replay_mix_ratio is not None

    def share_size(self, task: str, num_rows: int) -> int:
        """Rows of `task` (with `num_rows` train rows) that EasyCL-style replay keeps."""
        listed = self.listed_count(task, num_rows)
        return listed if listed is not None else int(num_rows * (self.replay_ratio or 0.0))
