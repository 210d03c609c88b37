"""The `seq` method: one LoRA adapter, trained on each task in turn."""

from __future__ import annotations

from pathlib import Path

import torch

from retain.cl.base import CLMethod, Task
from retain.cl.seq import SPEC
from retain.model.adapters import add_lora, load_adapter_weights, lora_config, save_adapter


class Seq(CLMethod):
    spec = SPEC
    adapter_name = "default"

    def prepare_model(self, model, tokenizer):
        self.tokenizer = tokenizer
        return add_lora(model, self.adapter_name, lora_config(self.config.finetuning))

    def save_task(self, model: torch.nn.Module, task: Task, directory: Path) -> None:
        save_adapter(model, self.adapter_name, directory / "adapter")

    def load_task(self, model: torch.nn.Module, task: Task | None, directory: Path) -> None:
        load_adapter_weights(model, self.adapter_name, directory / "adapter")
