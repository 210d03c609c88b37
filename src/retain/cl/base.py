"""The method interface. A continual-learning method is one class behind these hooks.

The task loop (`retain.training.sequence`) and the trainer (`retain.training.trainer`) call only
these hooks and know no method names. A method declares a `MethodSpec` (`retain.cl.registry`) in
its package's `__init__.py` and points the spec at its `CLMethod` subclass, which names the spec.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from retain.cl.loss import LossTerms

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, TrainerCallback

    from retain.cl.loss import LossScale
    from retain.cl.registry import MethodSpec
    from retain.data.prompt import PromptBuilder
    from retain.data.tasks import TaskData
    from retain.eval.predict import EvalContext, Score
    from retain.hparams.parser import RunConfig


@dataclass(frozen=True)
class Task:
    """One task of the sequence. `index` is 0-based, `id` is 1-based (row `id` of the matrix)."""

    index: int
    name: str

    @property
    def id(self) -> int:
        return self.index + 1


class CLMethod:
    """Base class: sequential LoRA fine-tuning behaviour with no-op hooks to override."""

    #: The registry entry of this method (its name, summary and config dataclass).
    spec: ClassVar[MethodSpec]
    #: Why the method cannot train with sharded parameters (DeepSpeed ZeRO-3, FSDP), or None when it can:
    #: a method that reads or copies whole adapter weights outside the forward pass says so here.
    sharding_limit: ClassVar[str | None] = None
    #: Tasks are saved in `output_dir / task_dir_pattern.format(id=..., index=...)`.
    task_dir_pattern: ClassVar[str] = "task_{id}"

    def __init__(self, config: RunConfig):
        self.config = config
        self.args = config.method_args
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.tasks: list[Task] = []
        #: Named terms of the loss for the training log (`retain.cl.loss.LossTerms`); add them in `compute_loss`.
        self.loss_terms = LossTerms()

    @property
    def name(self) -> str:
        return self.spec.name

    # ---- layout ---------------------------------------------------------------
    def task_dir(self, task: Task) -> Path:
        return Path(self.config.training.output_dir) / self.task_dir_pattern.format(
            id=task.id, index=task.index
        )

    # ---- model and data ----------------------------------------------------------
    def model_kind(self) -> str:
        """'causal-lm' (default) or 'encoder': which auto class loads the backbone."""
        return "causal-lm"

    def encode_task(self, data: TaskData, builder: PromptBuilder, cutoff_len: int) -> None:
        """Fill `data.train_rows` with what the collator takes (default: prompt + answer ids, answer-only labels)."""
        from retain.data.tasks import encode_task

        encode_task(data, builder, cutoff_len)

    def collator(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        from retain.data.prompt import TrainCollator

        return TrainCollator(tokenizer.pad_token_id)

    def prepare_model(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
        """Wrap the base model with the method's adapters (called once per process)."""
        raise NotImplementedError

    def begin_task(self, model: torch.nn.Module, task: Task, data: TaskData) -> None:
        """Activate or create what the task trains. Called before the trainer is built."""

    def training_rows(self, task: Task, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The encoded rows the trainer sees for this task (replay mixes earlier rows in here)."""
        return rows

    def begin_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Called once per optimizer step, before its first micro-batch, with every micro-batch of the
        step's gradient-accumulation window (for example to draw one replay batch for the whole step)."""

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], scale: LossScale
    ) -> torch.Tensor:
        """The training loss of one micro-batch, normalised through `scale`."""
        from retain.cl.loss import causal_lm_loss

        return causal_lm_loss(model, inputs, scale)

    def loss_parts(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], scale: LossScale
    ) -> list[Callable[[], torch.Tensor]]:
        """The micro-batch's loss as parts the trainer backpropagates one after the other (each part's
        activations are freed before the next part's forward), in training. Their sum is the loss.
        Default: one part, `compute_loss`."""
        return [lambda: self.compute_loss(model, inputs, scale)]

    def callbacks(self, model: torch.nn.Module) -> list[TrainerCallback]:
        """Trainer callbacks for this task (for example an EMA update after each optimizer step)."""
        return []

    def end_task(self, model: torch.nn.Module, task: Task, data: TaskData) -> None:
        """Update method state after training the task (every rank)."""

    def save_task(self, model: torch.nn.Module, task: Task, directory: Path) -> None:
        """Write everything needed to continue after `task` into `directory` (main process only)."""
        raise NotImplementedError

    def load_task(self, model: torch.nn.Module, task: Task | None, directory: Path) -> None:
        """Restore the state that `save_task` wrote, as the starting point of the next task."""
        raise NotImplementedError

    # ---- mid-task checkpoints ---------------------------------------------------------
    def save_checkpoint(self, model: torch.nn.Module, directory: Path) -> None:
        """Write the method state that a Trainer checkpoint does not hold into `directory`.

        Called on every process whenever the Trainer writes a checkpoint (`save_steps`), with the
        checkpoint folder (`.../checkpoint-N`), after optimizer step N and its callbacks, and before
        the Trainer writes its own files there. The Trainer already saves what it trains (the
        model's trainable weights), the optimizer, the scheduler and the RNG states; a method
        saves what it keeps outside them (an EMA copy, a replay buffer, counters). Write
        atomically (`retain.io`); per-process state goes in per-process files. Default: nothing.
        """

    def load_checkpoint(self, model: torch.nn.Module, directory: Path) -> None:
        """Restore what `save_checkpoint` wrote, before training resumes from that checkpoint.

        Called on every process after `begin_task` and before the Trainer restores its own part of
        the checkpoint. Default: nothing.
        """

    # ---- the report ---------------------------------------------------------------------------
    def report_info(self) -> dict[str, Any]:
        """Figures the run's report shows about the method's own work (`method_info` in metrics.json and a
        "Method" section in report.md): for example how many generated rows were kept or dropped.
        JSON-serialisable; default: nothing."""
        return {}

    # ---- export ---------------------------------------------------------------------------
    def export(self, model: torch.nn.Module, directory: Path) -> list[Path]:
        """Write what a user serves after the restored task as PEFT adapter folder(s) under `directory`;
        return the folders (`retain export` merges each into the base with --merge).

        Default: the adapter `default`, in `directory` itself. A method whose evaluated weights are
        elsewhere overrides this (I-LoRA: its `ema` adapter; stacked LoRAs: merged into one).
        """
        from retain.model.adapters import save_adapter

        save_adapter(model, "default", directory)
        return [directory]

    # ---- evaluation -----------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation(self, model: torch.nn.Module, trained: Task | None, evaluated: Task) -> Iterator[None]:
        """Select what answers for `evaluated` after training `trained` (None: the base model)."""
        if trained is None:
            with model.disable_adapter():
                yield
        else:
            yield

    def evaluate(
        self, model: torch.nn.Module, trained: Task | None, evaluated: Task, data: TaskData, ctx: EvalContext
    ) -> Score:
        """Score the model on `evaluated`'s test split (default: greedy generation, exact match)."""
        from retain.eval.predict import generative_score

        label = "base" if trained is None else f"after {trained.name}"
        return generative_score(model, data, ctx, desc=f"eval {evaluated.name} ({label})")

    def base_evaluation_key(self) -> str | None:
        """How this method scores the base model (row 0), as a short name; None: not cacheable.

        The task loop keeps row 0 in a cross-run cache (`retain.eval.base_cache`, config key
        `eval_base_cache`) keyed by the base weights, the test rows, the prompt format, the
        generation settings and this name. Return a name only when `evaluation(model, None, ...)`
        plus `evaluate` score the plain base model and depend on nothing else (no method state, no
        seeded head). Default: 'generative' when the method keeps both default hooks, else None.
        """
        cls = type(self)
        if cls.evaluation is CLMethod.evaluation and cls.evaluate is CLMethod.evaluate:
            return "generative"
        return None
