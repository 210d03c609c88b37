"""The `multitask` reference: joint training on the tasks seen so far, not a continual method.

Task t trains the LoRA adapter from its initial weights (the same for every task) on the rows of
this run's tasks 1..t together; the Trainer shuffles them. Row t of the matrix is therefore a model
trained jointly on the first t tasks, and the last row is the multi-task model of the whole
sequence. Training cost grows with t: task t sees the rows of t tasks. A continuation run
(`previous_task_model`) has no rows of the tasks before its first one and does not use them.
"""

from __future__ import annotations

from typing import Any

import torch

from retain.cl.base import Task
from retain.cl.multitask import SPEC
from retain.cl.seq.method import Seq
from retain.model.adapters import adapter_parameters


class MultiTask(Seq):
    spec = SPEC
    sharding_limit = "each task starts from a copy of the initial adapter's whole weights"

    def __init__(self, config):
        super().__init__(config)
        self.train_rows: dict[str, list[dict[str, Any]]] = {}
        self.initial_adapter: dict[str, torch.Tensor] = {}

    def encode_task(self, data, builder, cutoff_len):
        super().encode_task(data, builder, cutoff_len)
        self.train_rows[data.name] = data.train_rows

    def prepare_model(self, model, tokenizer):
        model = super().prepare_model(model, tokenizer)
        params = adapter_parameters(model, self.adapter_name)
        self.initial_adapter = {key: p.detach().clone() for key, p in params.items()}
        return model

    def begin_task(self, model, task, data):
        with torch.no_grad():
            for key, param in adapter_parameters(model, self.adapter_name).items():
                param.copy_(self.initial_adapter[key])

    def training_rows(self, task: Task, rows):
        earlier = [row for t in self.tasks if t.index < task.index for row in self.train_rows[t.name]]
        return earlier + rows
