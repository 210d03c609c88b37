"""O-LoRA: stacked per-task LoRAs (retain.cl.stacked) plus an orthogonality penalty between the current
task's A and the earlier tasks' A. `orthogonal_lambda: 0` is IncLoRA. docs/methods/olora.md."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import PartialState

from retain.cl.olora import SPEC
from retain.cl.olora.config import OLoRAArguments
from retain.cl.stacked.method import StackedLoRA
from retain.cl.stacked.penalties import orthogonal_loss

logger = logging.getLogger(__name__)


class OLoRA(StackedLoRA):
    spec = SPEC
    penalty_name = "loss_orthogonal"

    def __init__(self, config):
        super().__init__(config)
        self.args: OLoRAArguments
        if (
            self.args.olora_history_path
            and not config.cl.previous_task_model
            and PartialState().is_main_process
        ):
            # EasyCL's configs carry it for the first task too; it only replaces previous_task_model's LoRAs.
            logger.warning(
                "note: 'olora_history_path' is not used: there is no previous_task_model to continue from"
            )

    def penalty_weight(self) -> float:
        return self.args.orthogonal_lambda

    def penalty(self) -> torch.Tensor | None:
        """sum over modules and tasks i < t of sum(|A_i A_t^T|); none for the first task."""
        if self.current.id == 1:
            return None
        return orthogonal_loss(self.earlier_a(), self.current_a)

    def history_dir(self, previous_task_model: Path) -> Path:
        return Path(self.args.olora_history_path) if self.args.olora_history_path else previous_task_model
