"""EWC on the LoRA weights: `seq` plus `ewc_lambda / 2 * sum_i F_i (theta_i - theta*_i)^2`.

After each task, `end_task` computes that task's diagonal Fisher F_t (the mean over
`ewc_num_samples` train rows of each row's squared gradient), adds it to the running Fisher
(`F <- ewc_gamma * F + F_t`) and keeps theta*, the adapter's weights after the task. Every later
training step adds the penalty once per optimizer step. The formulas and the choices are in
docs/methods/ewc.md; the math is in pure functions (`ewc_penalty`, `accumulate_fisher`,
`squared_gradient_mean`, `fisher_row_indices`) so tests can check it by hand.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from retain.cl.base import Task
from retain.cl.ewc import SPEC
from retain.cl.ewc.config import EWCArguments
from retain.cl.loss import LossScale, causal_lm_sums
from retain.cl.seq.method import Seq
from retain.data.prompt import pad_batch
from retain.errors import ModelError, TrainingError
from retain.model.adapters import adapter_parameters

logger = logging.getLogger(__name__)

#: The running Fisher and theta*, saved with each task (float32, keyed by adapter tensor name).
STATE_FILE = "ewc_state.safetensors"
FISHER_PREFIX = "fisher/"
ANCHOR_PREFIX = "anchor/"

# ---- pure math -----------------------------------------------------------------------------------------


def ewc_penalty(
    params: Sequence[torch.Tensor],
    fisher: Sequence[torch.Tensor],
    anchor: Sequence[torch.Tensor],
    weight: float,
) -> torch.Tensor:
    """`weight / 2 * sum_i F_i (theta_i - theta*_i)^2` over every tensor, in float32."""
    total = params[0].new_zeros((), dtype=torch.float32)
    for param, f, a in zip(params, fisher, anchor, strict=True):
        total = total + (f * (param.float() - a).square()).sum()
    return 0.5 * weight * total


def squared_gradient_mean(row_gradients: Iterable[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """The diagonal Fisher of one task: the mean over rows of each row's squared gradient (float32)."""
    sums: list[torch.Tensor] | None = None
    count = 0
    for grads in row_gradients:
        squares = [g.detach().float().square() for g in grads]
        if sums is None:
            sums = squares
        else:
            torch._foreach_add_(sums, squares)
        count += 1
    if sums is None:
        raise ValueError("the Fisher needs at least one row")
    torch._foreach_div_(sums, float(count))
    return sums


def accumulate_fisher(
    running: Sequence[torch.Tensor] | None, task_fisher: Sequence[torch.Tensor], gamma: float
) -> list[torch.Tensor]:
    """Online EWC: `gamma * running + task_fisher` (just `task_fisher` for the first task)."""
    if running is None:
        return [f.clone() for f in task_fisher]
    return [gamma * r + f for r, f in zip(running, task_fisher, strict=True)]


def fisher_row_indices(num_rows: int, num_samples: int, seed: int, task_name: str) -> list[int]:
    """Which train rows give a task's Fisher: `min(num_samples, num_rows)` distinct indices drawn by a
    generator seeded with (seed, task name), in ascending order. The same on every process; the
    global random state is not touched."""
    count = min(num_samples, num_rows)
    return sorted(random.Random(f"{seed}:ewc:{task_name}").sample(range(num_rows), count))


# ---- helpers around the model ----------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) for the block; each module's own mode is restored after."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    model.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.training = mode


@contextlib.contextmanager
def private_rng(device: torch.device) -> Iterator[None]:
    """The block's random draws (if any) leave the global CPU and accelerator generators as they were."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            yield
    else:
        with torch.random.fork_rng(devices=[device], device_type=device.type):
            yield


# ---- the method ----------------------------------------------------------------------------------------


class EWC(Seq):
    """One LoRA adapter, trained task after task, held near theta* where the Fisher is large."""

    spec = SPEC
    sharding_limit = "its Fisher, anchor and penalty read every adapter weight whole"

    def __init__(self, config):
        super().__init__(config)
        self.args: EWCArguments
        self.keys: list[str] = []  # adapter tensor names, sorted: the order of every list below
        self.params: list[torch.nn.Parameter] = []
        self.fisher: list[torch.Tensor] | None = None  # None: no task consolidated yet
        self.anchor: list[torch.Tensor] | None = None  # theta*: the weights after the last task
        if self.args.previous_task_data and PartialState().is_main_process:
            logger.warning(
                "note: 'previous_task_data' is not used: each task's Fisher is computed when the task ends "
                "and saved with it (previous_task_model brings it along)"
            )

    def prepare_model(self, model, tokenizer):
        peft_model = super().prepare_model(model, tokenizer)
        self.bind(peft_model)
        return peft_model

    def bind(self, model) -> None:
        params = adapter_parameters(model, self.adapter_name)
        self.keys = sorted(params)
        self.params = [params[k] for k in self.keys]

    # ---- the training step -----------------------------------------------------------------------
    def compute_loss(self, model, inputs, scale: LossScale) -> torch.Tensor:
        """Answer-token cross-entropy plus, once per optimizer step, the EWC penalty."""
        total, count = causal_lm_sums(model, inputs)
        ce = scale.token_mean(total, count)
        if not model.training:
            return ce
        if self.fisher is None or self.args.ewc_lambda == 0:
            self.loss_terms.add(loss_ce=ce, loss_ewc=ce.new_zeros(()))
            return ce
        self._follow_device()
        penalty = scale.batch_mean(ewc_penalty(self.params, self.fisher, self.anchor, self.args.ewc_lambda))
        self.loss_terms.add(loss_ce=ce, loss_ewc=penalty)
        return ce + penalty

    def _follow_device(self) -> None:
        """Keep F and theta* where the weights are (an engine may move the model after `load_task`)."""
        device = self.params[0].device
        if self.fisher[0].device != device:
            self.fisher = [f.to(device) for f in self.fisher]
            self.anchor = [a.to(device) for a in self.anchor]

    # ---- task boundaries -------------------------------------------------------------------------
    def end_task(self, model, task: Task, data) -> None:
        """Add this task's Fisher to the running one and keep theta* (every process, the same rows)."""
        start = time.perf_counter()
        indices = fisher_row_indices(
            len(data.train_rows), self.args.ewc_num_samples, self.config.training.seed, task.name
        )
        task_fisher = self.task_fisher(model, [data.train_rows[i] for i in indices])
        self.fisher = accumulate_fisher(self.fisher, task_fisher, self.args.ewc_gamma)
        self.anchor = [p.detach().float().clone() for p in self.params]
        logger.info(
            "EWC: Fisher of task %s from %d rows in %.1f s",
            task.name,
            len(indices),
            time.perf_counter() - start,
        )

    def task_fisher(self, model, rows: list[dict]) -> list[torch.Tensor]:
        """Mean over `rows` of the squared gradient of each row's mean answer-token loss.

        One forward and backward pass per row, in eval mode (no dropout), through `torch.autograd.grad`
        (no `.grad` is touched, so the optimizer state of the next task is unaffected), with the
        global random state left as it was.
        """
        device = self.params[0].device
        pad_id = self.tokenizer.pad_token_id

        def gradients() -> Iterator[tuple[torch.Tensor, ...]]:
            for row in rows:
                batch = {k: v.to(device) for k, v in pad_batch([row], pad_id, side="right").items()}
                total, count = causal_lm_sums(model, batch)
                if int(count) == 0:
                    raise TrainingError("EWC: a train row without answer tokens reached the Fisher pass")
                yield torch.autograd.grad(total / count, self.params)

        with private_rng(device), eval_mode(model), torch.enable_grad():
            return squared_gradient_mean(gradients())

    def save_task(self, model, task: Task, directory: Path) -> None:
        super().save_task(model, task, directory)
        if self.fisher is None:
            raise TrainingError("EWC: save_task before end_task computed the Fisher")
        tensors = {
            FISHER_PREFIX + k: f.detach().cpu().contiguous()
            for k, f in zip(self.keys, self.fisher, strict=True)
        }
        tensors.update(
            {
                ANCHOR_PREFIX + k: a.detach().cpu().contiguous()
                for k, a in zip(self.keys, self.anchor, strict=True)
            }
        )
        meta = {"format": "1", "ewc_gamma": repr(self.args.ewc_gamma)}
        save_file(tensors, str(Path(directory) / STATE_FILE), metadata=meta)

    def load_task(self, model, task: Task | None, directory: Path) -> None:
        """The adapter, the running Fisher and theta* saved after a task (the next task starts here)."""
        super().load_task(model, task, directory)
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ModelError("EWC state not found (not a task directory of an ewc run?)", source=str(path))
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format") != "1":
                raise ModelError("unknown EWC state format", source=str(path))
        saved = load_file(str(path))
        expected = {FISHER_PREFIX + k for k in self.keys} | {ANCHOR_PREFIX + k for k in self.keys}
        if set(saved) != expected:
            raise ModelError("the saved EWC state does not match the model's adapter", source=str(path))
        device = self.params[0].device
        self.fisher = [saved[FISHER_PREFIX + k].to(device, torch.float32) for k in self.keys]
        self.anchor = [saved[ANCHOR_PREFIX + k].to(device, torch.float32) for k in self.keys]
