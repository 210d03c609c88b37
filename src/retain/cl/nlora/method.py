"""N-LoRA: stacked per-task LoRAs (retain.cl.stacked) plus an L1 penalty on the current task's update
B_t A_t. docs/methods/nlora.md."""

from __future__ import annotations

import torch

from retain.cl.nlora import SPEC
from retain.cl.nlora.config import NLoRAArguments
from retain.cl.stacked.method import StackedLoRA
from retain.cl.stacked.penalties import sparsity_loss


class NLoRA(StackedLoRA):
    spec = SPEC
    penalty_name = "loss_l1"

    def __init__(self, config):
        super().__init__(config)
        self.args: NLoRAArguments

    def penalty_weight(self) -> float:
        return self.args.nlora_lambda

    def penalty(self) -> torch.Tensor | None:
        """sum over modules of ||B_t A_t||_1."""
        return sparsity_loss(self.current_b, self.current_a)
