"""A-GEM (Chaudhry et al., 2019) on the LoRA gradient: one constraint from all earlier tasks together.

At each optimizer step, `agem_batch_size` rows drawn from the earlier tasks' memories together
give one reference gradient r; when the step's gradient g has `g . r < 0`, it becomes
`g - (g . r / r . r) r` (`retain.cl.projection.math.agem_project`). The memories, the reference
gradient and the callback are shared with `gem` (`retain.cl.projection.method`);
docs/methods/agem.md has the details.
"""

from __future__ import annotations

from retain.cl.agem import SPEC
from retain.cl.agem.config import AGEMArguments
from retain.cl.buffer import Row
from retain.cl.projection.math import Projection, agem_project
from retain.cl.projection.memory import draw_pooled
from retain.cl.projection.method import GradientProjection


class AGEM(GradientProjection):
    spec = SPEC
    args: AGEMArguments

    def memory_size(self, task_name: str, num_rows: int) -> int:
        return min(self.args.agem_memory_size, num_rows)

    def reference_batch_size(self) -> int | None:
        return self.args.agem_batch_size

    def reference_rows(self, names: list[str], size: int, step: int) -> list[list[Row]]:
        return [draw_pooled(self.memory.groups, names, size, self.draw_rng(step))]

    def project(self, grad, refs) -> Projection:
        return agem_project(grad, refs[0])
