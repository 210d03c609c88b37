"""The task loop: train each task in turn, evaluate after each one, keep a resumable state file.

It knows no method names: everything method-specific goes through the `CLMethod` hooks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from accelerate.state import AcceleratorState
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import set_seed

from retain.cl.base import CLMethod, Task
from retain.cl.registry import load_method
from retain.data.prompt import PromptBuilder
from retain.data.tasks import TaskData, load_tasks
from retain.errors import ConfigError, RetainError
from retain.eval.base_cache import BaseRowEntry, base_model_id
from retain.eval.metrics import micro_metrics
from retain.eval.predict import EvalContext
from retain.eval.report import LOG_DIR, build_metrics, write_loss_curve, write_results
from retain.hparams.parser import RunConfig
from retain.io import atomic_dir, atomic_write_json, atomic_write_text, exclusive_use, make_writable_dir
from retain.model.loader import load_model
from retain.training.state import STATE_FILE, RunState, load_or_create
from retain.training.trainer import CLTrainer, last_complete_checkpoint

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def shards_parameters(training: Any) -> bool:
    """Whether the training arguments shard the parameters: FSDP, or DeepSpeed ZeRO stage 3."""
    if training.fsdp:
        return True
    if not training.deepspeed:
        return False
    settings = training.deepspeed
    if not isinstance(settings, dict):
        try:
            settings = json.loads(Path(settings).read_text())
        except (OSError, json.JSONDecodeError):
            return False  # transformers reports an unreadable DeepSpeed config itself
    return (settings.get("zero_optimization") or {}).get("stage") == 3


def check_sharding(config: RunConfig, method: CLMethod) -> None:
    if method.sharding_limit and shards_parameters(config.training):
        raise ConfigError(
            f"cl_method {method.name} cannot train with sharded parameters (ZeRO-3, FSDP): {method.sharding_limit}; "
            "use DDP or DeepSpeed ZeRO-2",
            field="deepspeed" if config.training.deepspeed else "fsdp",
        )


@contextlib.contextmanager
def tensorboard_dir(path: Path) -> Iterator[None]:
    """Point transformers' TensorBoard callback at `path` (unless the user set TENSORBOARD_LOGGING_DIR)."""
    if "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(path)
    try:
        yield
    finally:
        del os.environ["TENSORBOARD_LOGGING_DIR"]


class Session:
    """A prepared run: config checked, data loaded and encoded, model wrapped by the method."""

    def __init__(self, config: RunConfig, *, force: bool = False):
        config = copy.deepcopy(config)  # the run changes its own copy only (output_dir while training)
        self.config = config
        _ = config.training.device  # sets up the process group the way the Trainer will use it
        self.state_ = PartialState()
        self.output_dir = Path(config.training.output_dir)
        make_writable_dir(self.output_dir, "output_dir", ConfigError)
        if config.model.device_map and self.state_.num_processes > 1:
            raise ConfigError(
                "places the model in one process; with several, the launcher places it", field="device_map"
            )
        self.method: CLMethod = load_method(config.cl.cl_method)(config)
        check_sharding(config, self.method)
        self.data: list[TaskData] = load_tasks(config.data)
        first_id = config.cl.current_task_id or 1
        self.tasks = [Task(first_id - 1 + j, d.name) for j, d in enumerate(self.data)]
        # Task states always live in output_dir; a run that continues from task k > 1 (one command
        # per task, as with LLaMA-Factory) keeps its state and results in a subfolder of its own.
        self.run_dir = self.output_dir if first_id == 1 else self.output_dir / f"from_task{first_id}"
        self.method.tasks = self.tasks
        self.state = self._load_or_create_state(force)
        self.model: torch.nn.Module | None = None
        self.model_at: int | None = None  # id of the task whose state the model holds; 0 = fresh
        self.base_model_id: str | None = None  # fingerprint of the base weights, when row 0 is cached
        self._clock = time.time()  # wall time up to here is added to the state at the next save

    def load(self) -> None:
        """Load the model, encode the data and let the method wrap the model (once)."""
        if self.model is not None:
            return
        model, tokenizer = load_model(self.config.model, kind=self.method.model_kind())
        if self.config.cl.eval_base and self.config.cl.eval_base_cache:
            self.base_model_id = base_model_id(self.config.model, model)
        self.tokenizer = tokenizer
        self.builder = PromptBuilder(tokenizer, self.config.data.template)
        for task_data in self.data:
            self.method.encode_task(task_data, self.builder, self.config.data.cutoff_len)
        set_seed(self.config.training.seed)  # adapter initialisation depends on the seed only
        self.model = self.method.prepare_model(model, tokenizer)
        training, placed = (
            self.config.training,
            self.config.model.device_map or self.config.model.quantization_bit,
        )
        if training.device.type != "cpu" and not (training.deepspeed or training.fsdp or placed):
            # Row 0 and `retain eval` run before any Trainer exists: put the model where it trains.
            self.model.to(training.device)

    # ---- state -------------------------------------------------------------------------
    def _load_or_create_state(self, force: bool) -> RunState:
        resolved = _jsonable(self.config.resolved())
        return load_or_create(self.run_dir / STATE_FILE, resolved, [t.name for t in self.tasks], force)

    def save_state(self) -> None:
        """Write state.json (main process), with the wall time of this invocation added so far."""
        now = time.time()
        self.state.wall_time_s += now - self._clock
        self._clock = now
        if self.state_.is_main_process:
            self.state.save(self.run_dir / STATE_FILE)

    def write_config(self) -> None:
        if self.state_.is_main_process:
            text = yaml.safe_dump(self.state.config, sort_keys=False, allow_unicode=True)
            atomic_write_text(self.run_dir / CONFIG_FILE, text)

    # ---- model state -----------------------------------------------------------------------
    def restore(self, task_id: int) -> None:
        """Make the model hold the state saved after task `task_id` (0: the fresh start)."""
        if self.model_at == task_id:
            return
        if task_id == 0:
            previous = self.config.cl.previous_task_model
            if previous:
                self.method.load_task(self.model, None, Path(previous))
            elif self.model_at not in (None, 0):
                raise RetainError("cannot return to the fresh model inside one process")
        else:
            directory = self.output_dir / self.state.trained[task_id]
            self.method.load_task(self.model, self._task(task_id), directory)
        self.model_at = task_id

    def _task(self, task_id: int) -> Task:
        return next(t for t in self.tasks if t.id == task_id)

    def _prev_id(self, task: Task) -> int:
        return 0 if task is self.tasks[0] else task.id - 1

    # ---- training ---------------------------------------------------------------------------
    def train_task(self, task: Task, data: TaskData) -> None:
        cfg = self.config
        self.restore(self._prev_id(task))
        set_seed(cfg.training.seed)
        self.method.begin_task(self.model, task, data)
        rows = self.method.training_rows(task, data.train_rows)
        checkpoint_dir = self.output_dir / "checkpoints" / f"task_{task.id}"
        args = cfg.training
        args.output_dir = str(checkpoint_dir)
        if args.deepspeed:
            # Each task's Trainer builds its own Accelerator with the DeepSpeed plugin; accelerate keeps one
            # accelerator state per process, so the previous task's is dropped (the process group stays).
            AcceleratorState._reset_state(reset_partial_state=False)
        try:
            with tensorboard_dir(self.run_dir / TENSORBOARD_DIR):
                trainer = CLTrainer(
                    model=self.model,
                    args=args,
                    train_dataset=Dataset.from_list(rows),
                    data_collator=self.method.collator(self.tokenizer),
                    callbacks=self.method.callbacks(self.model),
                    method=self.method,
                    task=task,
                    step_offset=self.state.steps_before(task.id),
                )
            resume = last_complete_checkpoint(checkpoint_dir)
            if resume is not None:
                self.method.load_checkpoint(self.model, resume)
            trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        finally:
            args.output_dir = str(self.output_dir)
        self.method.end_task(self.model, task, data)
        directory = self.method.task_dir(task)
        if self.state_.is_main_process:
            with atomic_dir(directory) as tmp:
                self.method.save_task(self.model, task, tmp)
            atomic_write_json(
                self.run_dir / LOG_DIR / f"train_task_{task.id}.json", trainer.state.log_history
            )
        self.state_.wait_for_everyone()
        self.state.trained[task.id] = str(directory.relative_to(self.output_dir))
        self.state.steps[task.id] = trainer.state.global_step
        self.save_state()
        if self.state_.is_main_process:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                checkpoint_dir.parent.rmdir()  # `checkpoints/` goes when no task has checkpoints left
            if cfg.cl.plot_loss:
                write_loss_curve(self.run_dir)
        self.model_at = task.id

    # ---- evaluation -------------------------------------------------------------------------
    def _eval_context(self) -> EvalContext:
        return EvalContext(
            tokenizer=self.tokenizer,
            builder=self.builder,
            batch_size=self.config.training.per_device_eval_batch_size,
            max_new_tokens=self.config.generating.max_new_tokens,
            share_prefix=self.config.generating.eval_prefix_cache,
            mode=self.config.generating.eval_mode,
            choice_normalization=self.config.generating.choice_normalization,
        )

    def evaluate_entry(self, row: int, column: int) -> float:
        """Score on task `column` (0-based) of the model after row `row` (0: base)."""
        data = self.data[column]
        evaluated = self.tasks[column]
        trained = self.tasks[row - 1] if row > 0 else None
        ctx = self._eval_context()
        cached = None  # row 0 across runs, when the method says how it scores the base model
        method_key = self.method.base_evaluation_key() if row == 0 and self.base_model_id else None
        if method_key is not None:
            device = next(self.model.parameters()).device
            cached = BaseRowEntry.open(self.base_model_id, method_key, data, ctx, device)
        result = cached.load() if cached is not None else None
        if result is None:
            with self.method.evaluation(self.model, trained, evaluated):
                result = self.method.evaluate(self.model, trained, evaluated, data, ctx)
            if cached is not None:
                cached.store(result)
        self.state.eval_counts[evaluated.name] = {"scored": result.scored, "unlabeled": result.unlabeled}
        entries = {**result.extra}
        if result.row_accuracy:  # row counts, for the averages over test rows (micro)
            entries.update({"correct": result.correct, "scored": result.scored})
        for name, value in entries.items():
            table = self.state.counts if name in ("correct", "scored") else self.state.extra
            matrix = table.setdefault(name, [[None] * len(self.tasks) for _ in range(len(self.tasks) + 1)])
            matrix[row][column] = value
        if self.state_.is_main_process and row > 0 and result.predictions is not None:
            self._write_predictions(row, column, result.predictions)
        return result.accuracy

    def _write_predictions(self, row: int, column: int, predictions: list[str]) -> None:
        data = self.data[column]
        lines = [
            json.dumps({"prediction": p, "answer": e.answer}, ensure_ascii=False)
            for p, e in zip(predictions, data.test, strict=True)
        ]
        atomic_write_text(
            self.run_dir / "predictions" / f"after_{row}" / f"{data.name}.jsonl", "\n".join(lines) + "\n"
        )

    def columns_for_row(self, row: int) -> list[int]:
        count = len(self.tasks)
        if self.config.cl.eval_scope == "all" or row == 0:
            return list(range(count))
        return list(range(min(row + 1, count)))

    def evaluate_row(self, row: int) -> None:
        todo = [c for c in self.columns_for_row(row) if self.state.matrix[row][c] is None]
        if not todo:
            return
        if row > 0:
            self.restore(self.tasks[row - 1].id)
        for column in todo:
            self.state.matrix[row][column] = self.evaluate_entry(row, column)
            self.save_state()

    # ---- the whole sequence -------------------------------------------------------------------
    def metrics(self, wall_time: float) -> dict[str, Any]:
        cfg = self.config
        return build_metrics(
            [t.name for t in self.tasks],
            self.state.matrix,
            {
                "method": cfg.cl.cl_method,
                "model": cfg.model.model_name_or_path,
                "seed": cfg.training.seed,
                "wall_time_s": round(wall_time, 1),
                "eval_mode": cfg.generating.eval_mode,
                "eval_split": cfg.data.eval_split,
                "eval_counts": self.state.eval_counts,
                **micro_metrics(self.state.counts.get("correct"), self.state.counts.get("scored")),
                **({"extra_matrices": self.state.extra} if self.state.extra else {}),
                **({"method_info": info} if (info := self.method.report_info()) else {}),
                "title": f"{cfg.cl.cl_method} on {cfg.model.model_name_or_path}",
            },
        )

    def run(self, *, train: bool = True, evaluate: bool = True) -> dict[str, Any] | None:
        if not self.state_.is_main_process:  # the main process holds the folder for every rank
            return self._run(train, evaluate)
        with exclusive_use(self.output_dir, "output_dir"):
            return self._run(train, evaluate)

    def _run(self, train: bool, evaluate: bool) -> dict[str, Any] | None:
        self._clock = time.time()
        self.load()
        if self.state_.is_main_process:  # after the checks of data and model: a bad input is one error line
            for note in self.config.notes:
                logger.warning("note: %s", note)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.save_state()
        try:
            self._run_tasks(train, evaluate)
        except BaseException:
            self.save_state()  # keep the time this invocation spent; everything else is saved as it finishes
            raise
        if not evaluate:
            self.save_state()
            return None
        self.state.finished = True
        self.save_state()
        result = self.metrics(self.state.wall_time_s)
        if self.state_.is_main_process:
            write_results(self.run_dir, result)
        return result

    def _run_tasks(self, train: bool, evaluate: bool) -> None:
        if evaluate and self.config.cl.eval_base and self.tasks[0].id == 1:
            self.restore(0)
            self.evaluate_row(0)
        main = self.state_.is_main_process
        for task, data in tqdm(list(zip(self.tasks, self.data, strict=True)), desc="tasks", disable=not main):
            if task.id not in self.state.trained:
                if not train:
                    raise RetainError(f"task '{task.name}' is not trained yet: run `retain train` first")
                self.train_task(task, data)
            if evaluate:
                self.evaluate_row(self.tasks.index(task) + 1)

    def is_finished(self) -> bool:
        return self.state.finished

    def close(self) -> None:
        """End the processes' group together: one that exits with it open can abort in its teardown."""
        self.state_.wait_for_everyone()
        self.state_.destroy_process_group()
