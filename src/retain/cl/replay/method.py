"""The `replay` method: `seq` plus earlier tasks' rows mixed into each task's training rows.

Two rules, chosen by the config (docs/methods/replay.md):
- EasyCL's (default): when task i ends, `int(replay_ratio * n_i)` of its n_i train rows (or its
  `maxsamples_list` count) are drawn uniformly without replacement, with a generator seeded by
  `seed` and the task's name, and kept; every later task trains on its own rows plus the kept rows
  of every earlier task (or of the tasks in `replay_task_list`).
- retain's per-batch mixing (`replay_mix_ratio`): a reservoir memory keeps a uniform sample of at
  most `replay_buffer_size` of all earlier rows; task k adds `round(replay_mix_ratio * n_k)` rows
  drawn from it with a generator seeded by `seed` and the task index.
The Trainer shuffles the mixture.
"""

from __future__ import annotations

import random
from pathlib import Path

from retain.cl.base import Task
from retain.cl.buffer import ReservoirBuffer, Row, load_row_groups, save_row_groups
from retain.cl.replay import SPEC
from retain.cl.replay.config import ReplayArguments
from retain.cl.seq.method import Seq
from retain.data.tasks import load_encoded_tasks
from retain.errors import ModelError

MEMORY_FILE = "replay_memory.safetensors"  # the reservoir (replay_mix_ratio)
SHARES_FILE = "replay_shares.safetensors"  # the kept rows of each earlier task (EasyCL's rule)


def draw_share(rows: list[Row], count: int, seed: int, task: str) -> list[Row]:
    """`count` rows drawn uniformly without replacement, reproducibly for (seed, task)."""
    return random.Random(f"{seed}:{task}").sample(rows, min(count, len(rows)))


class Replay(Seq):
    spec = SPEC

    def __init__(self, config):
        super().__init__(config)
        self.args: ReplayArguments
        self.memory = ReservoirBuffer(self.args.replay_buffer_size, seed=config.training.seed)
        self.shares: dict[str, list[Row]] = {}
        self.builder = None

    def encode_task(self, data, builder, cutoff_len):
        super().encode_task(data, builder, cutoff_len)
        self.builder = builder

    def training_rows(self, task: Task, rows):
        seed = self.config.training.seed
        if self.args.mixing:
            count = round(self.args.replay_mix_ratio * len(rows))
            return rows + self.memory.sample(count, random.Random(seed * 1000 + task.index))
        self._read_listed_tasks()
        names = self.args.replay_task_list or list(self.shares)
        return rows + [row for name in names for row in self.shares.get(name, [])]

    def _read_listed_tasks(self) -> None:
        """Keep the shares of `replay_task_list` tasks that no run of this sequence has trained."""
        unseen = self.args.unseen_tasks(set(self.shares) | {t.name for t in self.tasks})
        folder = self.args.previous_tasks_dir(self.config.data.dataset_dir)
        for data in load_encoded_tasks(folder, unseen, self.config.data, self.builder):
            count = self.args.share_size(data.name, len(data.train_rows))
            self.shares[data.name] = draw_share(data.train_rows, count, self.config.training.seed, data.name)

    def end_task(self, model, task, data):
        if self.args.mixing:
            for row in data.train_rows:
                self.memory.add(row)
            return
        count = self.args.share_size(task.name, len(data.train_rows))
        self.shares[task.name] = draw_share(data.train_rows, count, self.config.training.seed, task.name)

    def save_task(self, model, task: Task, directory: Path) -> None:
        super().save_task(model, task, directory)
        if self.args.mixing:
            self.memory.save(directory / MEMORY_FILE)
        else:
            save_row_groups(directory / SHARES_FILE, self.shares)

    def load_task(self, model, task, directory: Path) -> None:
        super().load_task(model, task, directory)
        path = Path(directory) / (MEMORY_FILE if self.args.mixing else SHARES_FILE)
        if not path.is_file():
            other = "EasyCL's replay_ratio" if self.args.mixing else "replay_mix_ratio"
            raise ModelError(f"replay memory not found (was the task saved with {other}?)", source=str(path))
        if self.args.mixing:
            self.memory.load(path)
        else:
            self.shares = load_row_groups(path)
