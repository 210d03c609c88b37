"""One Trainer subclass for every method: it asks the method for the loss and checks it is finite."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from retain.cl.base import CLMethod, Task
from retain.errors import TrainingError
from retain.training.loss import LossScale


class CLTrainer(Trainer):
    """`transformers.Trainer` that delegates the loss to a continual-learning method.

    The method returns a loss already normalised for gradient accumulation and for the
    number of processes (see `LossScale`), so the Trainer must not rescale it.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, method: CLMethod, task: Task, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.method = method
        self.task = task
        # Count label tokens for every model, so `num_items_in_batch` always reaches the method.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scale = LossScale(
            num_items=num_items_in_batch,
            accumulation_steps=self.current_gradient_accumulation_steps if model.training else 1,
            num_processes=self._token_average_factor(),
        )
        loss = self.method.compute_loss(model, inputs, scale)
        return (loss, None) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The Trainer prefetches one optimizer step's micro-batches; the method sees them all first.
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self.method.begin_step(batch_samples)
        return batch_samples, num_items_in_batch

    def _token_average_factor(self) -> int:
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            return self.accelerator.num_processes
        return 1

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss)):
            raise TrainingError(
                f"non-finite loss ({loss.item()}) in task '{self.task.name}' at step {self.state.global_step + 1}; "
                "lower learning_rate or check the data"
            )
        return loss
