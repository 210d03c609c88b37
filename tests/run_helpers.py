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


#: `python -c KILL_DURING_TASK_2 CONFIG` runs `retain run CONFIG` and SIGKILLs itself after task 2's second
#: optimizer step: a test-only patch of the trainer, production code is untouched.
KILL_DURING_TASK_2 = """
import os, signal, sys
from transformers import TrainerCallback
from retain.training import trainer as trainer_module


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)


original_init = trainer_module.CLTrainer.__init__


def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    if self.task.id == 2:
        self.add_callback(KillAt())


trainer_module.CLTrainer.__init__ = init
from retain.cli import main

sys.exit(main(["run", sys.argv[1]]))
"""
