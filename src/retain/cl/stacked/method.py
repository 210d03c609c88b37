"""`StackedLoRA`: one peft LoRA adapter per task; the earlier ones frozen and active.

The model carries the adapters `task-1`, `task-2`, ... (created once, in order, right after the run
seeds the RNG, so each one's initial value depends on the seed and its task id only). Once tasks
1..k are trained, a frozen adapter `earlier` holds their LoRAs concatenated along the rank dimension
(A: [k r, in], B: [out, k r], the same scale), so that one LoRA product per layer computes
`scale * sum_{i<=k} B_i A_i x` however many tasks there are. While task t trains, every LoRA layer's
active adapters are `earlier` (tasks 1..t-1) and `task-t`, and only `task-t` requires grad; after
task k, `earlier` (tasks 1..k) alone answers. The per-task adapters are what is saved and loaded.
Subclasses add a penalty on the current LoRA (`penalty`), weighted by a config key; both methods
add `l2_lambda * ||(A_t, B_t)||^2`. docs/methods/olora.md and docs/methods/nlora.md give the
formulas and every decision.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback

from retain.cl.base import CLMethod, Task
from retain.cl.loss import LossScale, causal_lm_loss
from retain.cl.stacked.penalties import squared_frobenius
from retain.errors import ConfigError, ModelError, RetainError, TrainingError
from retain.io import atomic_write_json
from retain.model.adapters import (
    add_lora,
    load_adapter_weights,
    lora_config,
    save_adapter,
    set_trainable,
    tuner_layers,
)

EARLIER = "earlier"  # the frozen concatenation of the trained tasks' LoRAs (never saved with a task)
ADAPTERS_DIR = "adapters"  # task directory: adapters/task-1/, ..., adapters/task-k/ (standard PEFT layout)
MANIFEST = "stack.json"  # task directory: how many LoRAs it holds
TASK_LOSS, L2_LOSS = "loss_ce", "loss_l2"  # logged term names (the penalty's is the subclass's)


def adapter_name(task_id: int) -> str:
    return f"task-{task_id}"


def stack_names(count: int) -> list[str]:
    return [adapter_name(i) for i in range(1, count + 1)]


# ---- which adapters answer ----------------------------------------------------------------------------


def activate_stack(model: Any, names: Sequence[str], layers: Sequence[Any]) -> tuple[Any, Any, list[Any]]:
    """Make every adapter in `names` active in every LoRA layer, without touching `requires_grad`.

    peft's markers on the model and the tuner name the last adapter (the one a task trains; the
    Trainer reloads that one as trainable when it resumes a checkpoint); the layers' list, which
    their forward reads, holds them all. Returns the previous markers for `restore_markers`.
    """
    if not names:
        raise RetainError("no LoRA to activate")
    previous = (model.active_adapter, model.base_model.active_adapter, [m._active_adapter for m in layers])
    model.active_adapter = names[-1]
    model.base_model.active_adapter = names[-1]
    for layer in layers:
        layer._active_adapter = list(names)
    return previous


def restore_markers(model: Any, previous: tuple[Any, Any, list[Any]], layers: Sequence[Any]) -> None:
    model.active_adapter, model.base_model.active_adapter, markers = previous
    for layer, marker in zip(layers, markers, strict=True):
        layer._active_adapter = marker


def freeze_weights(layers: Sequence[Any], name: str, containers: Sequence[str]) -> None:
    """Keep the weights `containers` (peft's names, e.g. "lora_A") of adapter `name` frozen.

    Their `requires_grad` goes off now, and they are declared to peft (`frozen_peft_weight_names`, where
    peft has it), whose `set_adapter` (called by the Trainer when it resumes a checkpoint, before it
    builds the optimizer) then leaves them frozen instead of making the whole adapter trainable.
    """
    if not containers:
        return
    for layer in layers:
        for container in containers:
            getattr(layer, container)[name].requires_grad_(False)
        if hasattr(layer, "frozen_peft_weight_names"):
            declared = dict(layer.frozen_peft_weight_names)  # the class default is shared: never mutate it
            declared[name] = tuple(dict.fromkeys([*declared.get(name, ()), *containers]))
            layer.frozen_peft_weight_names = declared


class StackCallback(TrainerCallback):
    """Keeps the stack active when the Trainer resumes a checkpoint."""

    def __init__(self, method: StackedLoRA):
        self.method = method

    def on_train_begin(self, args, state, control, **kwargs):
        # Resuming, the Trainer reloads every adapter, then peft's set_adapter leaves the current one
        # alone active: activate the whole stack again (flags: the current LoRA alone trains).
        self.method.restore_stack()


# ---- the method ---------------------------------------------------------------------------------------


class StackedLoRA(CLMethod):
    """Stacked per-task LoRAs plus a subclass's penalty on the current one (and the shared L2 term)."""

    #: The name the subclass's penalty is logged under (its unweighted value).
    penalty_name: ClassVar[str]
    #: Weights of the training task's LoRA that never train (peft's names, e.g. "lora_A"): never in the
    #: optimizer, also after a resumed checkpoint (`freeze_weights`). Default: none, A and B train.
    frozen_weights: ClassVar[tuple[str, ...]] = ()
    sharding_limit = "it concatenates the earlier tasks' LoRA weights and its penalties read the current LoRA's whole weights"

    def __init__(self, config):
        super().__init__(config)
        self.model: Any = None
        self.layers: list[Any] = []
        self.held = 0  # the model holds the trained LoRAs of tasks 1..held
        self.touched: set[int] = set()  # LoRAs trained or loaded in this process
        self.current: Task | None = None
        self.current_a: list[torch.nn.Parameter] = []
        self.current_b: list[torch.nn.Parameter] = []
        self.merged = 0  # `earlier` holds the LoRAs of tasks 1..merged (0: there is no `earlier`)
        self._penalties_due: bool | None = None  # None: no step of the current task has begun

    # ---- what a subclass provides -------------------------------------------------------------------
    def penalty_weight(self) -> float:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor | None:
        """The unweighted penalty on the current LoRA, summed over modules (None: nothing to penalise)."""
        raise NotImplementedError

    def history_dir(self, previous_task_model: Path) -> Path:
        """Where a continuation run reads the earlier LoRAs (default: previous_task_model itself)."""
        return previous_task_model

    # ---- model --------------------------------------------------------------------------------------
    def prepare_model(self, model, tokenizer):
        """Add `task-1..task-N` (N: the last task of this run), in order, all frozen."""
        self.tokenizer = tokenizer
        count = self.tasks[-1].id if self.tasks else 1
        for task_id in range(1, count + 1):
            model = add_lora(model, adapter_name(task_id), lora_config(self.config.finetuning))
        self.model = model
        self.layers = tuner_layers(model)
        for layer in self.layers:
            if adapter_name(1) not in getattr(layer, "lora_A", {}):
                raise ConfigError(
                    f"stacked LoRAs need linear target modules; {type(layer).__name__} is not one",
                    field="lora_target",
                )
        set_trainable(model, set())
        activate_stack(model, [adapter_name(1)], self.layers)
        return model

    def earlier_a(self) -> list[torch.Tensor]:
        """Per module, the A of tasks 1..t-1 stacked along the rank dimension: `earlier`'s A."""
        return [layer.lora_A[EARLIER].weight for layer in self.layers]

    def merge_earlier(self, count: int) -> None:
        """Make `earlier` the LoRAs of tasks 1..count, concatenated along the rank dimension (frozen).

        Its scale is copied from task 1's, so `earlier` computes `scale * sum_{i<=count} B_i A_i x`.
        Callers set which adapters are active and trainable afterwards (adding an adapter resets both).
        """
        model = self.model
        if EARLIER in model.peft_config:
            activate_stack(model, [adapter_name(1)], self.layers)  # peft re-activates what stays active
            model.delete_adapter(EARLIER)
        self.merged = 0
        if count == 0:
            return
        config = lora_config(self.config.finetuning)
        config.r, config.lora_alpha = count * config.r, count * config.lora_alpha
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # its random init is overwritten: leave the RNG alone
            add_lora(model, EARLIER, config)
        names = stack_names(count)
        with torch.no_grad():
            for layer in self.layers:
                layer.lora_A[EARLIER].weight.copy_(torch.cat([layer.lora_A[n].weight for n in names]))
                layer.lora_B[EARLIER].weight.copy_(torch.cat([layer.lora_B[n].weight for n in names], dim=1))
                layer.scaling[EARLIER] = layer.scaling[names[0]]
        self.merged = count

    def active_names(self, task_id: int, training: bool) -> list[str]:
        """The adapters that compute the stack of tasks 1..task_id (`task_id` trains when `training`)."""
        frozen = task_id - 1 if training else task_id
        names = [EARLIER] if frozen > 0 and self.merged == frozen else stack_names(frozen)
        return [*names, adapter_name(task_id)] if training else names

    # ---- task boundaries ----------------------------------------------------------------------------
    def begin_task(self, model, task: Task, data) -> None:
        if task.id in self.touched:
            raise RetainError(
                f"the LoRA of task {task.id} was already trained or loaded in this process; each task's LoRA "
                "is trained once (start a new process to train it again)"
            )
        if self.held != task.id - 1:
            raise ConfigError(
                f"task {task.id} trains on top of the LoRAs of tasks 1..{task.id - 1}, but the model holds "
                f"{self.held}: set previous_task_model to the task directory saved after task {task.id - 1}",
                field="previous_task_model",
            )
        self.current = task
        self.touched.add(task.id)
        name = adapter_name(task.id)
        self.current_a = [layer.lora_A[name].weight for layer in self.layers]
        self.current_b = [layer.lora_B[name].weight for layer in self.layers]
        if self.merged != task.id - 1:
            self.merge_earlier(task.id - 1)
        self._penalties_due = None
        self.restore_stack()

    def restore_stack(self) -> None:
        """`earlier` (tasks 1..t-1) and task t active, task t alone trainable (t: the task in training)."""
        if self.current is None:
            return
        set_trainable(self.model, {adapter_name(self.current.id)})
        freeze_weights(self.layers, adapter_name(self.current.id), self.frozen_weights)
        activate_stack(self.model, self.active_names(self.current.id, training=True), self.layers)

    def end_task(self, model, task: Task, data) -> None:
        self.hold(task.id)
        self.current = None
        self.current_a, self.current_b = [], []

    def hold(self, count: int) -> None:
        """The model holds the trained LoRAs of tasks 1..count: merge them, freeze all, let them answer."""
        self.held = count
        self.merge_earlier(count)
        set_trainable(self.model, set())
        activate_stack(self.model, self.active_names(count, training=False), self.layers)

    def callbacks(self, model):
        return [StackCallback(self)]

    # ---- the loss -----------------------------------------------------------------------------------
    def begin_step(self, micro_batches) -> None:
        self._penalties_due = True  # the step's first micro-batch adds them

    def compute_loss(self, model, inputs, scale: LossScale) -> torch.Tensor:
        """`L_task + weight * penalty + l2_lambda * ||(A_t, B_t)||^2`.

        The two penalties are per-step terms of the adapters alone: the step's first micro-batch
        adds them at full weight, once, whatever the gradient accumulation (the gradients add up
        over the micro-batches of the step). Under DDP every process adds the same values, and the
        gradient average keeps them once.
        """
        task_loss = causal_lm_loss(model, inputs, scale)
        if not model.training or self.current is None:
            return task_loss
        if self._penalties_due is None:
            raise TrainingError(
                "compute_loss ran before begin_step: the trainer must call method.begin_step once per "
                "optimizer step (retain.training.trainer.CLTrainer does)"
            )
        logged = {TASK_LOSS: task_loss.detach()}
        if not self._penalties_due:
            self.loss_terms.add(**logged)
            return task_loss
        self._penalties_due = False
        loss = task_loss
        terms = (
            (self.penalty_name, self.penalty_weight(), self.penalty),
            (L2_LOSS, self.args.l2_lambda, lambda: squared_frobenius(self.current_a + self.current_b)),
        )
        for name, weight, compute in terms:
            if weight > 0:
                value = compute()
                if value is not None:
                    loss = loss + weight * value
            else:  # computed for the log only: no graph, so the training is exactly the unregularised one
                with torch.no_grad():
                    value = compute()
            logged[name] = torch.zeros((), device=task_loss.device) if value is None else value.detach()
        self.loss_terms.add(**logged)
        return loss

    def export(self, model, directory: Path) -> list[Path]:
        """The held stack as one LoRA: `earlier`, the tasks' LoRAs concatenated along the rank (rank tasks x r,
        alpha tasks x alpha, so the same scale): `B' A' = sum_i B_i A_i` exactly (docs/models.md)."""
        if self.merged != self.held:
            self.merge_earlier(self.held)
        save_adapter(model, EARLIER, directory)
        return [directory]

    # ---- saving and loading -------------------------------------------------------------------------
    def save_task(self, model, task: Task, directory: Path) -> None:
        names = stack_names(task.id)
        for name in names:
            save_adapter(model, name, Path(directory) / ADAPTERS_DIR / name)
        atomic_write_json(
            Path(directory) / MANIFEST, {"method": self.name, "tasks": task.id, "adapters": names}
        )

    def load_task(self, model, task: Task | None, directory: Path) -> None:
        """The LoRAs of tasks 1..k saved after task k; `task` None: the earlier LoRAs of a continuation
        run (first task k+1), from previous_task_model or the subclass's `history_dir`."""
        if task is None:
            count = self.tasks[0].id - 1
            source = self.history_dir(Path(directory))
        else:
            count = task.id
            source = Path(directory)
        saved = read_manifest(source)
        if count == 0:
            raise ConfigError(
                f"{source} holds the LoRAs of tasks 1..{saved}; set current_task_id: {saved + 1} to continue "
                "after it",
                field="current_task_id",
            )
        if saved != count:
            raise ModelError(
                f"holds the LoRAs of tasks 1..{saved}, but continuing after task {count} needs tasks 1..{count}",
                source=str(source),
            )
        for name in stack_names(count):
            load_adapter_weights(model, name, source / ADAPTERS_DIR / name)
        self.touched.update(range(1, count + 1))
        self.hold(count)

    # ---- evaluation ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation(self, model, trained: Task | None, evaluated: Task) -> Iterator[None]:
        """Base row: adapters off. After task k: the LoRAs of tasks 1..k, all active (no task identity):
        `earlier` when it holds exactly them, else the per-task adapters (equal up to float rounding)."""
        if trained is None:
            with model.disable_adapter():
                yield
            return
        if trained.id > self.held:
            raise RetainError(f"the model holds the LoRAs of tasks 1..{self.held}, not of task {trained.id}")
        previous = activate_stack(model, self.active_names(trained.id, training=False), self.layers)
        try:
            yield
        finally:
            restore_markers(model, previous, self.layers)

    def base_evaluation_key(self) -> str | None:
        return "generative"  # row 0 is the plain model, adapters off, with greedy generation


def read_manifest(directory: Path) -> int:
    """How many LoRAs (tasks 1..k) a task directory saved by a stacked-LoRA method holds."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ModelError(f"not a stacked-LoRA task directory (no {MANIFEST})", source=str(directory))
    try:
        count = json.loads(path.read_text())["tasks"]
    except (ValueError, KeyError, TypeError):
        raise ModelError("unreadable stacked-LoRA manifest", source=str(path)) from None
    if not isinstance(count, int) or count < 1:
        raise ModelError(f"the manifest names {count!r} tasks", source=str(path))
    return count
