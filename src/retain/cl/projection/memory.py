"""Episodic memories: a fixed sample of each earlier task's encoded train rows, and seeded draws from them.

Every function here is deterministic given its seed and leaves the global random state alone, so
every process holds the same memories and draws the same reference rows.
"""

from __future__ import annotations

import random
from pathlib import Path

from retain.cl.buffer import ReservoirBuffer, Row, load_row_groups, save_row_groups
from retain.data.prompt import IGNORE_INDEX


def reservoir_sample(rows: list[Row], size: int, rng: random.Random) -> list[Row]:
    """A uniform sample of `min(size, len(rows))` rows: the rows offered one by one, in order, to a
    reservoir of `size` slots (Vitter's algorithm R, `retain.cl.buffer.ReservoirBuffer`) drawing from `rng`."""
    buffer = ReservoirBuffer(size)
    buffer.rng = rng
    for row in rows:
        buffer.add(row)
    return list(buffer.rows)


def label_count(row: Row) -> int:
    """Label tokens of a row that the shifted loss counts (every label after the first position)."""
    return sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)


def draw_per_task(
    groups: dict[str, list[Row]], names: list[str], size: int, rng: random.Random
) -> list[list[Row]]:
    """GEM: for each named task with rows, `min(size, rows)` distinct rows of its memory, in `names` order."""
    return [rng.sample(groups[name], min(size, len(groups[name]))) for name in names if groups.get(name)]


def draw_pooled(groups: dict[str, list[Row]], names: list[str], size: int, rng: random.Random) -> list[Row]:
    """A-GEM: `min(size, all rows)` distinct rows drawn uniformly from the named tasks' memories together."""
    pool = [row for name in names for row in groups.get(name, [])]
    return rng.sample(pool, min(size, len(pool)))


def step_rng(seed: int, method: str, task: str, step: int) -> random.Random:
    """The generator of one optimizer step's reference draw: the same on every process and after a resume."""
    return random.Random(f"{seed}:{method}:{task}:{step}")


class EpisodicMemory:
    """Task name -> the rows kept of that task, in the order the tasks were added."""

    def __init__(self) -> None:
        self.groups: dict[str, list[Row]] = {}

    def add_task(self, name: str, rows: list[Row], size: int, seed: int) -> None:
        """Keep a reservoir sample of `size` of the task's rows, seeded by (seed, task name)."""
        self.groups[name] = reservoir_sample(rows, size, random.Random(f"{seed}:memory:{name}"))

    def num_rows(self) -> int:
        return sum(len(rows) for rows in self.groups.values())

    def save(self, path: str | Path) -> None:
        save_row_groups(path, self.groups)

    def load(self, path: str | Path) -> None:
        self.groups = load_row_groups(path)
