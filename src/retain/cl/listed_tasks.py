"""EasyCL's listed earlier tasks: `replay_task_list`, `maxsamples_list`, `previous_task_dataset`.

Shared by the methods that keep rows of earlier tasks (replay, gem). A listed task that no run of
this sequence has trained is read from `previous_task_dataset` (else `dataset_dir`) with
`retain.data.tasks.load_encoded_tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class ListedTasksArguments:
    replay_task_list: list[str] | None = option(
        None,
        "EasyCL: comma-separated earlier tasks whose rows the method keeps (default: every earlier "
        "task). Tasks this run has not trained are read from previous_task_dataset (else dataset_dir).",
    )
    maxsamples_list: list[int] | None = option(
        None, "EasyCL: rows kept of each replay_task_list task, in the same order."
    )
    previous_task_dataset: str | None = option(
        None, "EasyCL: the folder (with dataset_info.json) holding the replay_task_list tasks."
    )

    def check_listed_tasks(self) -> None:
        if self.maxsamples_list is None:
            return
        if self.replay_task_list is None:
            raise ConfigError("needs replay_task_list (one count per listed task)", field="maxsamples_list")
        if len(self.maxsamples_list) != len(self.replay_task_list):
            raise ConfigError(
                f"has {len(self.maxsamples_list)} entries but replay_task_list has "
                f"{len(self.replay_task_list)}",
                field="maxsamples_list",
            )
        if any(count < 0 for count in self.maxsamples_list):
            raise ConfigError("counts must be >= 0", field="maxsamples_list")

    def unseen_tasks(self, known: set[str]) -> list[str]:
        """The listed tasks not in `known` (kept already, or tasks of this run)."""
        return [name for name in self.replay_task_list or [] if name not in known]

    def previous_tasks_dir(self, dataset_dir: str) -> str:
        """Where the unseen listed tasks are read from."""
        return self.previous_task_dataset or dataset_dir

    def listed_count(self, task: str, num_rows: int) -> int | None:
        """The `maxsamples_list` count of `task` (at most `num_rows`), or None when it has none."""
        if self.maxsamples_list is None or task not in (self.replay_task_list or []):
            return None
        return min(self.maxsamples_list[self.replay_task_list.index(task)], num_rows)
