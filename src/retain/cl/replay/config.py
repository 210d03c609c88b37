"""The `replay` method's config keys: EasyCL's names and meanings, plus retain's per-batch mixing."""

from __future__ import annotations

from dataclasses import dataclass, field

from retain.errors import ConfigError


@dataclass
class ReplayArguments:
    replay_ratio: float | None = field(
        default=None,
        metadata={
            "help": "EasyCL's meaning: the share (0..1) of each earlier task's train rows replayed with every "
            "later task. Default 0.3 (EasyCL's), unless replay_mix_ratio is set."
        },
    )
    replay_task_list: list[str] | None = field(
        default=None,
        metadata={
            "help": "Comma-separated earlier tasks to replay (EasyCL). Default: every earlier task. Tasks this "
            "run has not trained are read from previous_task_dataset (else dataset_dir)."
        },
    )
    maxsamples_list: list[int] | None = field(
        default=None,
        metadata={
            "help": "Rows replayed per task of replay_task_list, in the same order (EasyCL); replaces "
            "replay_ratio for those tasks."
        },
    )
    previous_task_dataset: str | None = field(
        default=None,
        metadata={"help": "Folder (with dataset_info.json) holding the replay_task_list tasks (EasyCL)."},
    )
    replay_mix_ratio: float | None = field(
        default=None,
        metadata={
            "help": "retain's per-batch mixing instead of EasyCL's shares: replayed rows per row of the current "
            "task (1.0: as many replayed rows as new ones), drawn from a reservoir memory of "
            "replay_buffer_size rows of all earlier tasks."
        },
    )
    replay_buffer_size: int = field(
        default=1000,
        metadata={"help": "Rows kept in the reservoir memory (with replay_mix_ratio only)."},
    )

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
        if self.maxsamples_list is not None:
            if self.replay_task_list is None:
                raise ConfigError(
                    "needs replay_task_list (one count per listed task)", field="maxsamples_list"
                )
            if len(self.maxsamples_list) != len(self.replay_task_list):
                raise ConfigError(
                    f"has {len(self.maxsamples_list)} entries but replay_task_list has "
                    f"{len(self.replay_task_list)}",
                    field="maxsamples_list",
                )
            if any(count < 0 for count in self.maxsamples_list):
                raise ConfigError("counts must be >= 0", field="maxsamples_list")

    @property
    def mixing(self) -> bool:
        """retain's per-batch mixing from a reservoir (True) or EasyCL's per-task shares (False)."""
        return self.replay_mix_ratio is not None

    def share_size(self, task: str, num_rows: int) -> int:
        """Rows of `task` (with `num_rows` train rows) that EasyCL-style replay keeps."""
        if self.maxsamples_list is not None and task in (self.replay_task_list or []):
            return min(self.maxsamples_list[self.replay_task_list.index(task)], num_rows)
        return int(num_rows * (self.replay_ratio or 0.0))
