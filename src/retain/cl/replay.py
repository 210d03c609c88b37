"""`replay`: sequential LoRA fine-tuning plus experience replay of earlier tasks' rows.

Sampling rule: a reservoir memory keeps a uniform sample of at most `replay_buffer_size`
of all training rows of the tasks finished so far. Training task k (k > 1) uses its own rows
plus `round(replay_ratio * len(rows))` rows drawn uniformly without replacement from the
memory (all of it when that is fewer), with a generator seeded by `seed` and the task index.
The Trainer shuffles the mixture.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from retain.cl.base import Task, register_method
from retain.cl.buffer import ReservoirBuffer
from retain.cl.seq import Seq
from retain.errors import ConfigError

MEMORY_FILE = "replay_memory.safetensors"


@dataclass
class ReplayArguments:
    replay_ratio: float = field(
        default=0.2, metadata={"help": "Replayed rows per row of the current task (0.2: 20% extra rows)."}
    )
    replay_buffer_size: int = field(
        default=1000, metadata={"help": "Rows kept in the reservoir memory of earlier tasks."}
    )

    def __post_init__(self) -> None:
        if self.replay_ratio < 0:
            raise ConfigError("must be >= 0", field="replay_ratio")
        if self.replay_buffer_size < 0:
            raise ConfigError("must be >= 0", field="replay_buffer_size")


@register_method
class Replay(Seq):
    name = "replay"
    arguments = ReplayArguments

    def __init__(self, config):
        super().__init__(config)
        self.memory = ReservoirBuffer(self.args.replay_buffer_size, seed=config.training.seed)

    def training_rows(self, task: Task, rows):
        count = round(self.args.replay_ratio * len(rows))
        rng = random.Random(self.config.training.seed * 1000 + task.index)
        return rows + self.memory.sample(count, rng)

    def end_task(self, model, task, data):
        for row in data.train_rows:
            self.memory.add(row)

    def save_task(self, model, task: Task, directory: Path) -> None:
        super().save_task(model, task, directory)
        self.memory.save(directory / MEMORY_FILE)

    def load_task(self, model, task, directory: Path) -> None:
        super().load_task(model, task, directory)
        self.memory.load(directory / MEMORY_FILE)
