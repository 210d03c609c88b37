"""Short runs of a method on the tiny model: their config values and their training logs."""

import json
from pathlib import Path


def two_task_values(tiny_config, learnable_dir: Path, tmp_path: Path, name: str, **overrides) -> dict:
    """A 2-task run on tasks the tiny model learns (2 epochs at 1e-2, every step logged) into tmp_path/name."""
    values = tiny_config(
        dataset_dir=str(learnable_dir),
        cl_tasks="task0,task1",
        learning_rate=1e-2,
        num_train_epochs=2,
        max_new_tokens=4,
        logging_steps=1,
        output_dir=str(tmp_path / name),
    )
    values.update(overrides)
    return values


def log_entries(run_dir: Path, task_id: int) -> list[dict]:
    """The training log entries of task `task_id` that carry a loss (one per logged step)."""
    history = json.loads((run_dir / "logs" / f"train_task_{task_id}.json").read_text())
    return [entry for entry in history if "loss" in entry]
