"""InfLoRA: stacked per-task LoRAs (retain.cl.stacked) whose down-projection A is designed, not trained.

Before task t, the inputs of every LoRA target layer on `inflora_samples` of the task's train rows give
a covariance C; the task's A is the top-r eigenvectors of C projected onto the complement of the layer's
stored subspace M (earlier tasks' input directions), frozen. B starts at 0 and alone trains, so the
update B A x is zero for every x in span(M). After the task, the same rows (through the trained stack)
grow M until it holds `inflora_threshold` of their input energy. The math is in `retain.cl.inflora.math`;
formulas and every decision are in docs/methods/inflora.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from retain.cl.base import Task
from retain.cl.inflora import SPEC
from retain.cl.inflora.config import InfLoRAArguments
from retain.cl.inflora.math import design_down_projection, empty_basis, grow_basis
from retain.cl.loss import LossScale, logged_causal_lm_loss
from retain.cl.stacked.method import StackedLoRA, adapter_name
from retain.data.prompt import pad_batch
from retain.errors import ConfigError, ModelError, RetainError, TrainingError

logger = logging.getLogger(__name__)

#: The stored subspace of every target layer, saved with each task: `basis/<layer name>` -> [d_in, k].
STATE_FILE = "inflora_state.safetensors"
BASIS_PREFIX = "basis/"
STATE_FORMAT = "1"

# ---- which rows, and the model while it only reads -------------------------------------------------


def collection_rows(num_rows: int, num_samples: int, seed: int, task_name: str) -> list[int]:
    """`min(num_samples, num_rows)` distinct train-row indices, ascending, drawn by a generator seeded with
    (seed, task name): the same on every process, and the global random state is not touched."""
    count = min(num_samples, num_rows)
    return sorted(random.Random(f"{seed}:inflora:{task_name}").sample(range(num_rows), count))


@contextlib.contextmanager
def reading(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), no grad, and the global random generators left as they were; each module's
    own mode is restored after."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    device = next(model.parameters()).device
    devices = [device] if device.type != "cpu" else []
    kind = {"device_type": device.type} if device.type != "cpu" else {}
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices, **kind), torch.no_grad():
            yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.training = mode


class InputCovariance:
    """Forward pre-hooks on the given layers that sum `x^T x` (float32) over the real tokens of each batch.

    Set `mask` (the batch's attention mask) before each forward; padding positions are left out.
    """

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.layers = list(layers)
        self.sums: list[torch.Tensor | None] = [None] * len(self.layers)
        self.tokens = 0
        self.mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> InputCovariance:
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            tokens = x.reshape(-1, x.shape[-1])[self.mask.reshape(-1)].float()
            product = tokens.T @ tokens
            total = self.sums[index]
            self.sums[index] = product if total is None else total + product

        return hook

    def covariances(self) -> list[torch.Tensor]:
        if self.tokens == 0 or any(s is None for s in self.sums):
            raise TrainingError("InfLoRA: the collection pass reached no token of some target layer")
        return [s / self.tokens for s in self.sums]


# ---- the method ----------------------------------------------------------------------------------------


class InfLoRA(StackedLoRA):
    """One LoRA per task, all active; the current task's A designed from its inputs and frozen, B trained."""

    spec = SPEC
    penalty_name = "none"
    frozen_weights = ("lora_A",)

    def __init__(self, config):
        super().__init__(config)
        self.args: InfLoRAArguments
        self.names: list[str] = []  # the target layers' module names (the keys of the saved bases)
        self.bases: list[torch.Tensor] = []  # per target layer, the stored subspace [d_in, k]
        #: Per subspace step: {"task", "phase" ("design" | "grow"), "rows", "tokens", "collect_s", "solve_s"}.
        self.timings: list[dict[str, Any]] = []

    # ---- model --------------------------------------------------------------------------------------
    def prepare_model(self, model, tokenizer):
        model = super().prepare_model(model, tokenizer)
        names = {id(module): name for name, module in model.named_modules()}
        self.names = [names[id(layer)] for layer in self.layers]
        first = adapter_name(1)
        for name, layer in zip(self.names, self.layers, strict=True):
            rank, dim = layer.lora_A[first].weight.shape
            if rank >= dim:
                raise ConfigError(
                    f"InfLoRA needs lora_rank below every target layer's input size; {name} has {dim}",
                    field="lora_rank",
                )
        self.bases = [empty_basis(layer.lora_A[first].weight.shape[1]) for layer in self.layers]
        return model

    # ---- task boundaries ----------------------------------------------------------------------------
    def begin_task(self, model, task: Task, data) -> None:
        """The stack of tasks 1..t-1 plus task t's LoRA (B = 0: the model computes what it did after task
        t-1) reads the task's rows; task t's A is designed from them and stays frozen."""
        super().begin_task(model, task, data)
        covs = self.collect(task, data, phase="design")
        start = time.perf_counter()
        name = adapter_name(task.id)
        with torch.no_grad():
            for layer, cov, basis in zip(self.layers, covs, self.bases, strict=True):
                weight = layer.lora_A[name].weight
                designed = design_down_projection(cov, basis.to(cov.device), weight.shape[0])
                weight.copy_(broadcast(designed).to(weight.dtype))
        self.timings[-1]["solve_s"] = time.perf_counter() - start

    def end_task(self, model, task: Task, data) -> None:
        """After the stack of tasks 1..t answers: the task's rows through it grow every stored subspace."""
        super().end_task(model, task, data)
        covs = self.collect(task, data, phase="grow")
        start = time.perf_counter()
        grown, full = [], 0
        for layer, cov, basis in zip(self.layers, covs, self.bases, strict=True):
            rank, dim = layer.lora_A[adapter_name(1)].weight.shape
            new = grow_basis(basis.to(cov.device), cov, self.args.inflora_threshold, max_dim=dim - rank)
            grown.append(broadcast_basis(new))
            full += grown[-1].shape[1] == dim - rank
        self.bases = grown
        self.timings[-1]["solve_s"] = time.perf_counter() - start
        dims = [b.shape[1] for b in self.bases]
        logger.info(
            "InfLoRA: after task %s the stored subspaces hold %d..%d directions (%d layers, %d full); %s",
            task.name,
            min(dims),
            max(dims),
            len(dims),
            full,
            self.timings[-1],
        )

    def collect(self, task: Task, data, phase: str) -> list[torch.Tensor]:
        """Each target layer's input covariance over the real tokens of the task's collection rows.

        Batches of `per_device_eval_batch_size` rows (the same on every process and at every training batch
        size), read-only: eval mode, no grad, the random state untouched, only the last position's logits.
        """
        start = time.perf_counter()
        rows = data.train_rows
        indices = collection_rows(len(rows), self.args.inflora_samples, self.config.training.seed, task.name)
        if not indices:
            raise TrainingError(f"InfLoRA: task {task.name} has no train rows to design its LoRA from")
        size = self.config.training.per_device_eval_batch_size
        device = next(self.model.parameters()).device
        with reading(self.model), InputCovariance(self.layers) as hooks:
            for begin in range(0, len(indices), size):
                chunk = [rows[i] for i in indices[begin : begin + size]]
                batch = pad_batch(chunk, self.tokenizer.pad_token_id, side="right", keys=("input_ids",))
                mask = batch["attention_mask"].to(device)
                hooks.mask = mask.bool()
                hooks.tokens += int(mask.sum())
                self.model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=mask,
                    logits_to_keep=1,
                    use_cache=False,
                )
            covs = hooks.covariances()
        self.timings.append(
            {
                "task": task.id,
                "phase": phase,
                "rows": len(indices),
                "tokens": hooks.tokens,
                "collect_s": time.perf_counter() - start,
            }
        )
        return covs

    def report_info(self) -> dict[str, Any]:
        """The subspace steps of every task so far, timed apart from training (collection and solve); each
        task state keeps those up to its task, so a resumed run reports the steps before the resume too."""
        return {"subspace_timings": self.timings} if self.timings else {}

    # ---- the loss -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, scale: LossScale) -> torch.Tensor:
        """The answer-token cross-entropy alone: InfLoRA has no penalty."""
        return logged_causal_lm_loss(model, inputs, scale, self.loss_terms)

    def penalty_weight(self) -> float:
        return 0.0

    def penalty(self) -> torch.Tensor | None:
        return None

    # ---- saving and loading -------------------------------------------------------------------------
    def save_task(self, model, task: Task, directory: Path) -> None:
        super().save_task(model, task, directory)
        tensors = {
            BASIS_PREFIX + n: b.detach().cpu().contiguous()
            for n, b in zip(self.names, self.bases, strict=True)
        }
        meta = {"format": STATE_FORMAT, "tasks": str(task.id), "threshold": repr(self.args.inflora_threshold)}
        meta["timings"] = json.dumps([t for t in self.timings if t["task"] <= task.id])
        save_file(tensors, str(Path(directory) / STATE_FILE), metadata=meta)

    def load_task(self, model, task: Task | None, directory: Path) -> None:
        """The LoRAs of tasks 1..k and the stored subspaces after task k (`task` None: a continuation run's
        earlier tasks, from previous_task_model)."""
        super().load_task(model, task, directory)
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ModelError(
                "InfLoRA state not found (not a task directory of an inflora run?)", source=str(path)
            )
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise ModelError("unknown InfLoRA state format", source=str(path))
        if meta.get("tasks") != str(self.held):
            raise ModelError(
                f"the subspaces are those after task {meta.get('tasks')}, not {self.held}", source=str(path)
            )
        saved = load_file(str(path))
        if set(saved) != {BASIS_PREFIX + n for n in self.names}:
            raise ModelError("the saved subspaces do not match the model's target layers", source=str(path))
        bases = []
        for name, layer in zip(self.names, self.layers, strict=True):
            basis = saved[BASIS_PREFIX + name]
            weight = layer.lora_A[adapter_name(1)].weight
            if (
                basis.dim() != 2
                or basis.shape[0] != weight.shape[1]
                or basis.shape[1] > weight.shape[1] - weight.shape[0]
            ):
                raise ModelError(f"subspace of {name} has shape {tuple(basis.shape)}", source=str(path))
            bases.append(basis.to(weight.device, torch.float32))
        self.bases = bases
        # The steps up to this task: a prefix of those of any later task, so the longest list seen is kept
        # (evaluation restores earlier tasks too).
        saved_timings = json.loads(meta.get("timings", "[]"))
        if len(saved_timings) > len(self.timings):
            self.timings = saved_timings

    def load_checkpoint(self, model, directory: Path) -> None:
        """Nothing to restore (begin_task designs the same A again); the Trainer must keep A frozen."""
        if not all(hasattr(layer, "frozen_peft_weight_names") for layer in self.layers):
            raise RetainError(
                "resuming an InfLoRA task from a checkpoint needs a peft whose LoRA layers keep declared "
                "weights frozen (frozen_peft_weight_names): upgrade peft, or delete "
                f"{directory.parent} to train the task again from its start"
            )


# ---- every process holds rank 0's state ---------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor (same shape everywhere) on every process; itself when there is one process."""
    if _distributed():
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=0)
    return tensor


def broadcast_basis(basis: torch.Tensor) -> torch.Tensor:
    """Rank 0's basis [d, k] on every process (k is sent first, so a rank whose k differs still agrees)."""
    if not _distributed():
        return basis
    count = torch.tensor([basis.shape[1]], device=basis.device)
    dist.broadcast(count, src=0)
    if dist.get_rank() != 0 and int(count) != basis.shape[1]:
        basis = basis.new_zeros(basis.shape[0], int(count))
    return broadcast(basis)
