"""The part `gem` and `agem` share: episodic memories, reference gradients and the projection callback.

A method built on `GradientProjection` trains one LoRA adapter like `seq`; what it adds happens
between the backward passes of an optimizer step and `optimizer.step()`:

1. When a task ends, a seeded reservoir sample of its train rows becomes its episodic memory
   (`memory_size` rows), saved with the task.
2. At each optimizer step (`on_pre_optimizer_step`, after the Trainer has accumulated, all-reduced
   and clipped the step's gradient), the subclass draws reference rows from the earlier tasks'
   memories with a generator seeded by (seed, task, step), the method computes one reference
   gradient per group of rows (`reference_gradients`), and the subclass projects the step's
   gradient (`project`). The result is clipped again to `max_grad_norm` if it got longer, and
   written back into `.grad`.

Docs: docs/methods/gem.md (the shared design is described there) and docs/methods/agem.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from retain.cl.base import Task
from retain.cl.buffer import Row
from retain.cl.loss import LossScale, causal_lm_sums, logged_causal_lm_loss
from retain.cl.projection.math import Projection, clip_to_norm
from retain.cl.projection.memory import EpisodicMemory, label_count, step_rng
from retain.cl.seq.method import Seq
from retain.data.prompt import pad_batch
from retain.errors import ConfigError, ModelError
from retain.model.adapters import adapter_parameters

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module) -> Iterator[None]:
    """Every dropout module in eval mode for the block (LoRA dropout included), the rest as it is: the
    reference pass is deterministic, and gradient checkpointing (active in train mode) still applies."""
    switched = [
        m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training
    ]
    for module in switched:
        module.eval()
    try:
        yield
    finally:
        for module in switched:
            module.train()


@contextlib.contextmanager
def private_rng(device: torch.device) -> Iterator[None]:
    """Random draws in the block (if any) leave the global CPU and accelerator generators as they were."""
    devices = [] if device.type == "cpu" else [device]
    kwargs = {} if device.type == "cpu" else {"device_type": device.type}
    with torch.random.fork_rng(devices=devices, **kwargs):
        yield


def reference_autocast(args: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on an accelerator when the run trains in bf16 (as the Trainer's forward does);
    otherwise none (fp16 without the Trainer's loss scaling could underflow: float32 instead)."""
    if device.type != "cpu" and getattr(args, "bf16", False):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ProjectionCallback(TrainerCallback):
    """Projects the step's gradient right before `optimizer.step()` (after clipping)."""

    def __init__(self, method: GradientProjection):
        self.method = method

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.method.project_step(model, args, state.global_step)


def memory_file_name(method: str) -> str:
    """The file in each task directory that holds a method's memories of the tasks so far."""
    return f"{method}_memory.safetensors"


class GradientProjection(Seq):
    """`seq` whose step gradient is projected against reference gradients from earlier tasks' memories."""

    sharding_limit = "it projects the whole flattened gradient of every adapter weight"

    def __init__(self, config):
        super().__init__(config)
        self.memory = EpisodicMemory()
        self.current: Task | None = None
        self.params: list[torch.nn.Parameter] = []
        training = config.training
        if training.deepspeed or training.fsdp:
            key = "deepspeed" if training.deepspeed else "fsdp"
            raise ConfigError(
                f"{self.name} projects the whole LoRA gradient on every process; DeepSpeed and FSDP shard "
                "it: not supported",
                field=key,
            )
        if training.fp16 and training.max_grad_norm <= 0:
            raise ConfigError(
                f"{self.name} projects the gradient before optimizer.step(); with fp16 and no clipping the "
                "gradient is still loss-scaled there: set max_grad_norm > 0 or use bf16",
                field="fp16",
            )

    # ---- what a subclass decides -----------------------------------------------------------------
    def memory_size(self, task_name: str, num_rows: int) -> int:
        """Rows of the task (with `num_rows` train rows) its memory keeps."""
        raise NotImplementedError

    def reference_batch_size(self) -> int | None:
        """Rows per reference gradient; None: the optimizer step's global batch."""
        raise NotImplementedError

    def reference_rows(self, names: list[str], size: int, step: int) -> list[list[Row]]:
        """The rows of each reference gradient of this step, from the memories of `names`."""
        raise NotImplementedError

    def project(self, grad: torch.Tensor, refs: torch.Tensor) -> Projection:
        raise NotImplementedError

    def logged_counts(self, result: Projection | None) -> dict[str, float]:
        """Per-step figures for the training log (None: nothing to project against this step)."""
        return {f"{self.name}_projected": float(result is not None and result.projected)}

    # ---- model and task boundaries ------------------------------------------------------------------
    def bind(self, model: torch.nn.Module) -> None:
        params = adapter_parameters(model, self.adapter_name)
        self.params = [params[k] for k in sorted(params) if params[k].requires_grad]

    def prepare_model(self, model, tokenizer):
        peft_model = super().prepare_model(model, tokenizer)
        self.bind(peft_model)
        return peft_model

    def begin_task(self, model, task: Task, data) -> None:
        self.current = task
        self.bind(model)
        names = self.earlier_tasks()
        if names:
            rows = sum(len(self.memory.groups[name]) for name in names)
            logger.info(
                "%s: task %s is constrained by %d earlier tasks (%d memory rows)",
                self.name,
                task.name,
                len(names),
                rows,
            )

    def earlier_tasks(self) -> list[str]:
        """Tasks with a memory, in the order they were trained (the current task's name excluded)."""
        current = self.current.name if self.current is not None else None
        return [name for name in self.memory.groups if name != current]

    def end_task(self, model, task: Task, data) -> None:
        """The task's memory: a reservoir sample of its train rows (the same on every process)."""
        size = self.memory_size(task.name, len(data.train_rows))
        self.memory.add_task(task.name, data.train_rows, size, self.config.training.seed)

    def save_task(self, model, task: Task, directory: Path) -> None:
        super().save_task(model, task, directory)
        self.memory.save(Path(directory) / memory_file_name(self.name))

    def load_task(self, model, task: Task | None, directory: Path) -> None:
        super().load_task(model, task, directory)
        path = Path(directory) / memory_file_name(self.name)
        if path.is_file():
            self.memory.load(path)
        elif self.memory_required():
            raise ModelError(
                f"{self.name} memory not found (not a task directory of a {self.name} run?)", source=str(path)
            )
        else:
            self.memory = EpisodicMemory()

    def memory_required(self) -> bool:
        """Whether a task directory without a memory file is an error (else: start with no memory)."""
        return True

    # ---- the training step ------------------------------------------------------------------------
    def compute_loss(self, model, inputs, scale: LossScale) -> torch.Tensor:
        return logged_causal_lm_loss(model, inputs, scale, self.loss_terms)

    def callbacks(self, model):
        return [ProjectionCallback(self)]

    def project_step(self, model: torch.nn.Module, args: Any, step: int) -> None:
        """Replace the step's (all-reduced, clipped) gradient by its projection, identically on every process."""
        device = self.params[0].device
        size = self.reference_batch_size() or (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        names = self.earlier_tasks()
        groups = [rows for rows in self.reference_rows(names, size, step) if rows] if names else []
        result = None
        if groups:
            grad = torch.cat([self._grad_of(p).reshape(-1).float() for p in self.params])
            refs = self.reference_gradients(model, groups, args)
            result = self.project(grad, refs)
            if result.projected:
                self._write_grad(clip_to_norm(result.grad, args.max_grad_norm))
        counts = self.logged_counts(result)
        self.loss_terms.add(**{k: torch.tensor(v, device=device) for k, v in counts.items()})

    def draw_rng(self, step: int):
        """The generator of this step's reference draw: seeded by (seed, method, current task, step)."""
        return step_rng(self.config.training.seed, self.name, self.current.name, step)

    def reference_gradients(self, model: torch.nn.Module, groups: list[list[Row]], args: Any) -> torch.Tensor:
        """One flat float32 gradient per group of rows: of the group's mean answer-token loss, over the
        trainable LoRA weights (a k x p matrix, the same on every process).

        The rows of a group are split over the processes (process i takes rows i, i + n, ...), each
        computes the gradient of its rows' summed token loss divided by the group's token count, in
        micro-batches of `per_device_train_batch_size` rows, and the parts are summed with an
        all-reduce: every process then holds the same matrix, whatever its kernels' rounding. The pass
        uses `torch.autograd.grad` on the unwrapped model (no `.grad` is touched, DDP's hooks do not
        fire), dropout off, and the global random state untouched.
        """
        device = self.params[0].device
        rank, world = args.process_index, args.world_size
        chunk = max(1, args.per_device_train_batch_size)
        pad_id = self.tokenizer.pad_token_id
        sizes = [p.numel() for p in self.params]
        refs = torch.zeros(len(groups), sum(sizes), dtype=torch.float32, device=device)
        with private_rng(device), dropout_off(model), torch.enable_grad(), reference_autocast(args, device):
            for index, rows in enumerate(groups):
                tokens = sum(label_count(row) for row in rows)
                mine = rows[rank::world]
                for start in range(0, len(mine), chunk):
                    part = mine[start : start + chunk]
                    if tokens == 0 or sum(label_count(row) for row in part) == 0:
                        continue
                    batch = {k: v.to(device) for k, v in pad_batch(part, pad_id, side="right").items()}
                    total, _ = causal_lm_sums(model, batch)
                    grads = torch.autograd.grad(total / tokens, self.params, allow_unused=True)
                    flat = [
                        torch.zeros(n, device=device) if g is None else g.reshape(-1).float()
                        for g, n in zip(grads, sizes, strict=True)
                    ]
                    refs[index] += torch.cat(flat)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(refs)
        return refs

    @staticmethod
    def _grad_of(param: torch.nn.Parameter) -> torch.Tensor:
        return param.grad if param.grad is not None else torch.zeros_like(param)

    def _write_grad(self, flat: torch.Tensor) -> None:
        start = 0
        with torch.no_grad():
            for param in self.params:
                piece = flat[start : start + param.numel()].view_as(param)
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.copy_(piece.to(param.grad.dtype))
                start += param.numel()
