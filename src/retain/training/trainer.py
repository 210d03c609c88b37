"""One Trainer subclass for every method: it asks the method for the loss and checks it is finite."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from retain.cl.base import CLMethod, Task
from retain.cl.loss import LossScale
from retain.errors import TrainingError

logger = logging.getLogger(__name__)


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest `checkpoint-N` in `directory` that was written to the end, or None.

    The Trainer writes `trainer_state.json` after the weights, the optimizer and the RNG states (and
    `CLTrainer` writes the method's state before all of them), so a folder without it is a checkpoint
    cut short by a kill, and is skipped.
    """
    if not directory.is_dir():
        return None
    steps = []
    for path in directory.iterdir():
        prefix, _, number = path.name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and number.isdigit() and (path / TRAINER_STATE_NAME).is_file():
            steps.append((int(number), path))
    return max(steps)[1] if steps else None


class ProgressBar(ProgressCallback):
    """The Trainer's progress bar without the dict of logged values it prints at every logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class LogToLogger(TrainerCallback):
    """The logged values (loss, learning rate, ...) go to retain's logger: shown with `retain --verbose`,
    and always kept in the run's `logs/train_task_<k>.json`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(
                "step %d: %s", state.global_step, {k: v for k, v in logs.items() if k != "total_flos"}
            )


class CLTrainer(Trainer):
    """`transformers.Trainer` that delegates the loss to a continual-learning method.

    The method returns a loss already normalised for gradient accumulation and for the
    number of processes (see `LossScale`), so the Trainer must not rescale it.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, method: CLMethod, task: Task, step_offset: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Keep the console to progress bars: logged values go to the logger and the run's log files.
        for noisy, quiet in ((ProgressCallback, ProgressBar), (PrinterCallback, None)):
            if self.pop_callback(noisy) is not None and quiet is not None:
                self.add_callback(quiet)
        self.add_callback(LogToLogger)
        self.method = method
        method.loss_terms.pop()  # nothing left over from an earlier task
        self.task = task
        #: Optimizer steps of the earlier tasks: logged steps (TensorBoard, W&B, the log history) count
        #: over the whole sequence instead of restarting at 0 with every task's Trainer.
        self.step_offset = step_offset
        # Count label tokens for every model, so `num_items_in_batch` always reaches the method.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scale = LossScale(
            num_items=num_items_in_batch,
            accumulation_steps=self.current_gradient_accumulation_steps if model.training else 1,
            num_processes=self._token_average_factor(),
        )
        if not model.training:
            loss = self.method.compute_loss(model, inputs, scale)
            return (loss, None) if return_outputs else loss
        parts = self.method.loss_parts(model, inputs, scale)
        done = None
        for part in parts[:-1]:  # backward now, so that this part's activations are freed before the next
            value = part()
            with self.accelerator.no_sync(model):  # gradients are synchronised once, with the last part
                self.accelerator.backward(value)
            done = value.detach() if done is None else done + value.detach()
        loss = parts[-1]()
        if done is not None:  # the whole loss is logged and checked; the earlier parts' gradients are in
            loss = loss + done
        return (loss, None) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The Trainer prefetches one optimizer step's micro-batches; the method sees them all first.
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self.method.loss_terms.new_step()
            self.method.begin_step(batch_samples)
        return batch_samples, num_items_in_batch

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs = {**logs, **self._loss_term_means()}
        self.state.global_step += self.step_offset
        try:
            super().log(logs, start_time)
        finally:
            self.state.global_step -= self.step_offset

    def _loss_term_means(self) -> dict[str, float]:
        """Per-step means of the method's loss terms since the last log, averaged over processes."""
        sums, steps = self.method.loss_terms.pop()
        if not sums:
            return {}
        values = torch.stack(list(sums.values()))
        if self.args.world_size > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        return {name: value / max(steps, 1) for name, value in zip(sums, values.tolist(), strict=True)}

    def _save_checkpoint(self, model, trial):
        # The method's state first, on every process, then the Trainer's files: the Trainer writes
        # `trainer_state.json` last, so a checkpoint that has it also has the method's state.
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.method.save_checkpoint(self.model, folder)
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)

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
