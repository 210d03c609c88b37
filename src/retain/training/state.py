"""A run's progress on disk (`state.json`): trained tasks, evaluated matrix entries, time spent."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retain.errors import ConfigError, RetainError
from retain.io import atomic_write_json, json_error

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
#: Keys that may differ between an interrupted run and its resumption.
RESUME_SAFE_KEYS = {
    "output_dir",
    "logging_steps",
    "report_to",
    "disable_tqdm",
    "per_device_eval_batch_size",
    "dataloader_num_workers",
    "run_name",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "model_cache_dir",
    "eval_base_cache",
    "plot_loss",
}


@dataclass
class RunState:
    """What is done: trained tasks (their saved state) and evaluated matrix entries."""

    config: dict[str, Any]
    tasks: list[str]
    trained: dict[int, str] = field(default_factory=dict)  # task id -> task dir (relative to output_dir)
    #: Optimizer steps each trained task took (task id -> steps): logged steps continue across tasks.
    steps: dict[int, int] = field(default_factory=dict)
    matrix: list[list[float | None]] = field(default_factory=list)
    eval_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Named extra figures of the evaluations (`Score.extra`), one (T+1) x T matrix per name.
    extra: dict[str, list[list[float | None]]] = field(default_factory=dict)
    #: Row counts of each entry scored as a row accuracy: {"correct": matrix, "scored": matrix}.
    counts: dict[str, list[list[int | None]]] = field(default_factory=dict)
    #: Wall time of every invocation of this run so far.
    wall_time_s: float = 0.0
    finished: bool = False

    @classmethod
    def new(cls, config: dict[str, Any], tasks: list[str]) -> RunState:
        return cls(config=config, tasks=tasks, matrix=[[None] * len(tasks) for _ in range(len(tasks) + 1)])

    def steps_before(self, task_id: int) -> int:
        return sum(steps for tid, steps in self.steps.items() if tid < task_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "config": self.config,
            "tasks": self.tasks,
            "trained": {str(k): v for k, v in self.trained.items()},
            "steps": {str(k): v for k, v in self.steps.items()},
            "matrix": self.matrix,
            "eval_counts": self.eval_counts,
            "extra_matrices": self.extra,
            "counts": self.counts,
            "wall_time_s": round(self.wall_time_s, 3),
            "finished": self.finished,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        return cls(
            config=data["config"],
            tasks=data["tasks"],
            trained={int(k): v for k, v in data["trained"].items()},
            steps={int(k): v for k, v in data.get("steps", {}).items()},
            matrix=data["matrix"],
            eval_counts=data.get("eval_counts", {}),
            extra=data.get("extra_matrices", {}),
            counts=data.get("counts", {}),
            wall_time_s=data.get("wall_time_s", 0.0),
            finished=data.get("finished", False),
        )

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


def load_or_create(path: Path, resolved: dict[str, Any], tasks: list[str], force: bool) -> RunState:
    """The saved state of the run at `path` if its config matches `resolved` (or `force`), else a new one.

    A saved run that trained no task (it failed before the end of its first task) is replaced
    without `--force`: at most its base-model row is recomputed, and that row is usually in the
    cross-run cache (`retain.eval.base_cache`).
    """
    if not path.is_file():
        return RunState.new(resolved, tasks)
    try:
        state = RunState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise RetainError(
            f"unreadable run state ({json_error(exc)}); move it away to start over", source=str(path)
        ) from None
    except (KeyError, TypeError, UnicodeDecodeError) as exc:
        raise RetainError(
            f"unreadable run state ({exc}); move it away to start over", source=str(path)
        ) from None
    changed = sorted(
        k
        for k in set(resolved) | set(state.config)
        if k not in RESUME_SAFE_KEYS and resolved.get(k) != state.config.get(k)
    )
    if state.tasks != tasks:
        changed.insert(0, "tasks")
    if changed and not state.trained:
        logger.warning(
            "note: the run in %s had trained no task: starting it again with this config", path.parent
        )
        return RunState.new(resolved, tasks)
    if changed and not force:
        raise ConfigError(
            f"the config differs from the run in this output_dir in: {', '.join(changed)} "
            "(use another output_dir, or --force to continue anyway)",
            source=str(path),
        )
    state.config = resolved
    return state
