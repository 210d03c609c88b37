"""GEM (Lopez-Paz and Ranzato, 2017) on the LoRA gradient: one constraint per earlier task.

At each optimizer step, every earlier task with a memory gives a reference gradient g_k (the
gradient of the mean answer-token loss of `gem_batch_size` rows drawn from its memory). If the
step's gradient g has a negative inner product with any g_k, it is replaced by GEM's dual-QP
solution with margin `gem_memory_strength` (`retain.cl.projection.math.gem_project`). The
shared machinery (memories, reference gradients, the callback) is `retain.cl.projection.method`;
docs/methods/gem.md has the formulas and choices.
"""

from __future__ import annotations

from retain.cl.buffer import Row
from retain.cl.gem import SPEC
from retain.cl.gem.config import GEMArguments
from retain.cl.projection.math import Projection, gem_project
from retain.cl.projection.memory import draw_per_task
from retain.cl.projection.method import GradientProjection
from retain.data.tasks import load_encoded_tasks


class GEM(GradientProjection):
    spec = SPEC
    args: GEMArguments

    def __init__(self, config):
        super().__init__(config)
        self.builder = None

    def encode_task(self, data, builder, cutoff_len):
        super().encode_task(data, builder, cutoff_len)
        self.builder = builder

    def memory_size(self, task_name: str, num_rows: int) -> int:
        return self.args.memory_size(task_name, num_rows)

    def reference_batch_size(self) -> int | None:
        return self.args.gem_batch_size

    def earlier_tasks(self) -> list[str]:
        names = super().earlier_tasks()
        listed = self.args.replay_task_list
        return names if listed is None else [name for name in names if name in listed]

    def reference_rows(self, names: list[str], size: int, step: int) -> list[list[Row]]:
        return draw_per_task(self.memory.groups, names, size, self.draw_rng(step))

    def project(self, grad, refs) -> Projection:
        return gem_project(grad, refs, self.args.gem_memory_strength)

    def logged_counts(self, result: Projection | None) -> dict[str, float]:
        violated = 0 if result is None else result.violated
        return {**super().logged_counts(result), "gem_violations": float(violated)}

    # ---- EasyCL's replay_task_list: memories of tasks no run of this sequence has trained --------
    def begin_task(self, model, task, data) -> None:
        self._read_listed_tasks()
        super().begin_task(model, task, data)

    def memory_required(self) -> bool:
        return self.args.replay_task_list is None

    def _read_listed_tasks(self) -> None:
        """Memories for `replay_task_list` tasks that are neither in memory nor tasks of this run."""
        unseen = self.args.unseen_tasks(set(self.memory.groups) | {t.name for t in self.tasks})
        folder = self.args.previous_tasks_dir(self.config.data.dataset_dir)
        for data in load_encoded_tasks(folder, unseen, self.config.data, self.builder):
            size = self.memory_size(data.name, len(data.train_rows))
            self.memory.add_task(data.name, data.train_rows, size, self.config.training.seed)
