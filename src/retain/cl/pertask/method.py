"""`peft`: one adapter per task on a frozen backbone (seed 004), with optional classifier heads.

Task t trains only its own adapter `task-{t}` (LoRA or a soft prompt), its own head (when a
classifier is set) and, with NewLoRA, the shared task router. Every other task's adapter and
head is frozen and stays bit-identical. See docs/methods/peft.md for the whole design.

This module glues the parts: `adapters` (create, freeze, switch, save, load), `model` (the module
with heads and router and its forward), `encoding` (rows) and `evaluation` (predictions, scores).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback

from retain.cl.base import CLMethod, Task
from retain.cl.loss import causal_lm_loss, shifted_targets, token_ce_sum
from retain.cl.pertask import SPEC
from retain.cl.pertask.adapters import (
    FRESH_SALT,
    TaskAdapters,
    adapter_name,
    task_adapter,
)
from retain.cl.pertask.config import PEFTArguments
from retain.cl.pertask.encoding import HeadCollator, RowEncoder, own_labels
from retain.cl.pertask.evaluation import evaluation_mode, predict_rows, sentence_score, word_score
from retain.cl.pertask.labels import LabelSpace, map_word_targets
from retain.cl.pertask.model import PerTaskModel, resolve_pooling
from retain.cl.pertask.router import preference_sum
from retain.data.prompt import IGNORE_INDEX
from retain.errors import DataError, ModelError, TrainingError
from retain.eval.predict import Score, generative_score
from retain.io import atomic_write_json

logger = logging.getLogger(__name__)

STATE_FILE = "pertask.json"
#: Mid-task checkpoint file (next to the Trainer's in `checkpoint-N/`).
CHECKPOINT_FILE = "pertask_checkpoint.json"
#: Engine LoRA keys that this method replaces by the seed's PEFT_lora_* keys.
ENGINE_LORA_KEYS = {
    "lora_rank": "PEFT_lora_r",
    "lora_alpha": "PEFT_lora_alpha",
    "lora_dropout": "PEFT_lora_dropout",
}


class _StepTracker(TrainerCallback):
    def __init__(self, method: PerTaskPEFT):
        self.method = method

    def on_step_begin(self, args, state, control, **kwargs):
        self.method.step = state.global_step + 1


class PerTaskPEFT(CLMethod):
    spec = SPEC
    task_dir_pattern = "lora_task_{index}"

    def __init__(self, config):
        super().__init__(config)
        self.args: PEFTArguments
        for key, ours in ENGINE_LORA_KEYS.items():
            if key in config.values and getattr(config.finetuning, key) != getattr(self.args, ours):
                config.notes.append(
                    f"'{key}' is not used by cl_method peft: its task adapters take {ours} "
                    f"({getattr(self.args, ours)})"
                )
        self.space = LabelSpace(self.args.classification_type) if self.args.uses_heads else None
        self.adapters = TaskAdapters(self.args, config.finetuning, config.training.seed)
        self.encoder: RowEncoder | None = None
        self.data: dict = {}
        self.current: Task | None = None
        self.step = 0
        self.skipped: dict[str, int] = {}

    @property
    def peft(self):
        return self.adapters.peft

    @property
    def model(self) -> PerTaskModel | None:
        return self.adapters.model

    def _task_name(self, index: int) -> str:
        for task in self.tasks:
            if task.index == index:
                return task.name
        if self.space is not None and index in self.space.names:
            return self.space.names[index]
        return f"task {index + 1}"

    def _index_of(self, name: str) -> int:
        for task in self.tasks:
            if task.name == name:
                return task.index
        raise KeyError(name)

    # ---- model and data ----------------------------------------------------------------------
    def model_kind(self) -> str:
        return "encoder" if self.args.uses_heads else "causal-lm"

    def collator(self, tokenizer):
        if not self.args.uses_heads:
            return super().collator(tokenizer)
        return HeadCollator(tokenizer.pad_token_id, self.args.word_level)

    def encode_task(self, data, builder, cutoff_len: int) -> None:
        self.data[data.name] = data
        if not self.args.uses_heads:
            super().encode_task(data, builder, cutoff_len)
            return
        if self.encoder is None:
            self.encoder = RowEncoder(builder, cutoff_len, self.args.word_level)
        labels = own_labels(data, self.args.word_level)
        self.space.set_task(self._index_of(data.name), data.name, labels)
        rows, truncated, dropped = self.encoder.train_rows(data, labels)
        if not rows:
            raise DataError(f"task '{data.name}' has no usable train row (all unlabeled or truncated away)")
        if dropped or truncated:
            logger.warning(
                "task %s: %d of %d train rows truncated to cutoff_len=%d, %d dropped (no label left or not in "
                "the label list)",
                data.name,
                truncated,
                len(data.train),
                cutoff_len,
                dropped,
            )
        data.train_rows, data.truncated_rows, data.dropped_rows = rows, truncated, dropped

    def _init_text(self, index: int) -> str | None:
        """The text whose embeddings start task `index`'s soft prompt (None: peft's random init)."""
        setting = self.args.PEFT_prompt_tuning_init_text
        if setting == "random":
            return None
        if setting != "auto":
            return setting
        name = self._task_name(index)
        data = self.data.get(name)
        if data is None:
            return name.replace("_", " ")
        instructions = Counter(e.extra.get("instruction") for e in data.train if e.extra.get("instruction"))
        if instructions:
            return instructions.most_common(1)[0][0]
        labels = data.labels or data.tags or []
        return name.replace("_", " ") + (": " + ", ".join(labels) if labels else "")

    def _add_adapter(self, index: int, base=None) -> None:
        text = self._init_text(index) if self.adapters.prompt_tuning else None
        self.adapters.add(index, base=base, prompt_text=text)

    def prepare_model(self, model, tokenizer):
        self.tokenizer = self.adapters.tokenizer = tokenizer
        first = self.tasks[0].index if self.tasks else 0
        if not self.args.uses_heads:
            self._add_adapter(first, base=model)
            self.adapters.set_trainable(None)
            return self.peft
        # Heads read hidden states: drop a causal LM's output layer (`base_model` is the bare transformer).
        self._add_adapter(first, base=getattr(model, "base_model", model))
        pooling = resolve_pooling(self.args.pooling, tokenizer.cls_token_id is not None)
        self.adapters.model = PerTaskModel(
            self.peft, pooling, self.args.word_level, self.adapters.num_virtual
        )
        if self.args.uses_router:
            num_task = max(t.index for t in self.tasks) + 1 if self.tasks else 1
            self.model.router = self.adapters.new_router(num_task)
        self.adapters.set_trainable(None)
        return self.model

    def begin_task(self, model, task: Task, data) -> None:
        self.current = task
        name = adapter_name(task.index)
        if name not in self.peft.peft_config:
            self._add_adapter(task.index)
        self.peft.set_adapter(name)
        if self.args.uses_heads:
            self.adapters.ensure_head(task.index, len(self.space.head_labels(task.index)))
            if self.args.word_level:
                self._own_global = torch.tensor(self.space.own_to_global(task.index))
        self.adapters.set_trainable(task.index)

    def callbacks(self, model):
        return [_StepTracker(self)]

    def end_task(self, model, task: Task, data) -> None:
        self.adapters.set_trainable(None)
        skipped = self.skipped.get(task.name, 0)
        if skipped:
            logger.warning(
                "task %s: %d micro-batches with a non-finite loss were skipped", task.name, skipped
            )

    # ---- training -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, scale):
        # `model` may be a data-parallel wrapper: everything that trains runs inside `model(...)`.
        if self.args.uses_heads:
            loss = self._head_loss(model, inputs, scale, self.current.index)
        elif self.adapters.prompt_tuning:
            loss = scale.token_mean(*self._prompt_lm_sums(model, inputs))
        else:
            loss = causal_lm_loss(model, inputs, scale)
        return self._finite(loss, model)

    def _prompt_lm_sums(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-token cross-entropy with a soft prompt: logits sit `num_virtual` positions later."""
        keep, targets = shifted_targets(inputs["labels"])
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            logits_to_keep=keep + self.adapters.num_virtual,
        )
        return token_ce_sum(out.logits, targets)

    def _head_loss(self, model, inputs, scale, t: int) -> torch.Tensor:
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        out = model(input_ids=ids, attention_mask=mask, task_index=t, route=self.args.uses_router)
        if self.args.word_level:
            own_global = self._own_global.to(labels.device)  # the Trainer may move the model after begin_task
            glob = torch.where(labels == IGNORE_INDEX, labels, own_global[labels.clamp(min=0)])
            targets = map_word_targets(glob, t, self.space.accum(t), self.space.pre_accum(t))
        else:
            targets = labels
        loss = scale.token_mean(*token_ce_sum(out.logits, targets))
        if out.router_weights is not None:
            rows = ids.size(0)
            preference = preference_sum(out.router_weights, t)
            # Per-row term: a mean over the step's rows. Word-level steps count tokens, so use the batch mean.
            loss = loss + (
                scale.batch_mean(preference / rows)
                if self.args.word_level
                else scale.token_mean(preference, rows)
            )
        return loss

    def _finite(self, loss: torch.Tensor, model) -> torch.Tensor:
        if bool(torch.isfinite(loss)):
            return loss
        task = self.current
        name = task.name if task else "?"
        if not self.args.skip_nonfinite_loss:
            raise TrainingError(
                f"non-finite loss ({loss.item()}) in task '{name}' at step {self.step}; lower learning_rate, "
                "check the data, or set skip_nonfinite_loss: true to skip such steps"
            )
        self.skipped[name] = self.skipped.get(name, 0) + 1
        logger.warning(
            "task %s, step %d: non-finite loss, micro-batch skipped (%d so far)",
            name,
            self.step,
            self.skipped[name],
        )
        params = [p for p in model.parameters() if p.requires_grad]
        # Zero, but connected to every trainable parameter: backward gives zero gradients.
        return torch.stack([p.reshape(-1)[0] for p in params]).sum() * 0.0

    # ---- evaluation ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation(self, model, trained: Task | None, evaluated: Task) -> Iterator[None]:
        if self.args.uses_heads:  # `evaluate` picks adapters and heads itself
            yield
            return
        if trained is None or (self.args.il_mode == "TIL" and evaluated.index > trained.index):
            with self.peft.disable_adapter():  # generation needs peft's own switch for soft prompts
                yield
            self.adapters.set_trainable(self.adapters.train_index)  # peft re-enables LoRA as trainable
            return
        target = trained.index if self.args.il_mode == "CIL" else evaluated.index
        with task_adapter(self.peft, adapter_name(target)):
            yield

    def base_evaluation_key(self) -> str | None:
        # Generative: the base row is the plain model (adapters off). Heads score the base row with a
        # seeded fresh head per task, which depends on more than the base model: not cached.
        return None if self.args.uses_heads else "generative"

    def evaluate(self, model, trained: Task | None, evaluated: Task, data, ctx) -> Score:
        label = "base" if trained is None else f"after {trained.name}"
        if not self.args.uses_heads:
            return generative_score(model, data, ctx, desc=f"eval {evaluated.name} ({label})")
        i = evaluated.index
        mode, last = evaluation_mode(
            self.args.il_mode, self.args.newlora_routing, None if trained is None else trained.index, i
        )
        fresh_head = None
        if mode == "fresh":  # not trained yet: a freshly initialised head over the task's classes (chance)
            fresh_head = self.adapters.new_head(
                len(self.space.til_labels(i)), self.adapters.seed(i, FRESH_SALT)
            )
        labels = own_labels(data, self.args.word_level)
        rows = self.encoder.test_rows(data, labels)
        predictions, routes = predict_rows(
            self.model,
            self.space,
            mode,
            i,
            last,
            rows.input_ids,
            ctx.batch_size,
            self.tokenizer.pad_token_id,
            fresh_head,
        )
        if self.args.word_level:
            gold = [example.extra["tags"] for example in data.test]
            score = word_score(self.space, i, last, gold, rows, predictions)
        else:
            score = sentence_score(self.space, i, last, rows, predictions, data.name)
        if routes is not None:
            score.extra = {"router_accuracy": sum(c == i for c in routes) / len(routes), **score.extra}
        return score

    # ---- saving and loading ------------------------------------------------------------------------
    def export(self, model, directory: Path) -> list[Path]:
        """One folder per task adapter (`task-<i>/`, the standard PEFT layout), each with its head when there
        are heads (`head.safetensors`, `head.json`; `retain.cl.pertask.adapters.load_exported_head`), and
        the router."""
        return [directory / name for name in self.adapters.save(directory, self.space)]

    def save_task(self, model, task: Task, directory: Path) -> None:
        names = self.adapters.save(directory, self.space)
        meta = {
            "format": 1,
            "method": self.name,
            "PEFT_type": self.args.PEFT_type,
            "classifier": self.args.classifier,
            "classification_type": self.args.classification_type,
            "adapters": names,
            "label_space": self.space.to_json() if self.space is not None else None,
            "nonfinite_skipped": self.skipped,
        }
        (directory / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    def load_task(self, model, task: Task | None, directory: Path) -> None:
        directory = Path(directory)
        meta_path = directory / STATE_FILE
        if not meta_path.is_file():
            raise ModelError(
                f"not a task directory of the peft method (no {STATE_FILE})", source=str(directory)
            )
        meta = json.loads(meta_path.read_text())
        for key in ("PEFT_type", "classifier", "classification_type"):
            if meta.get(key) != getattr(self.args, key):
                raise ModelError(
                    f"saved with {key}={meta.get(key)!r}, but this run has {getattr(self.args, key)!r}",
                    source=str(directory),
                    field=key,
                )
        if self.space is not None:
            self.space.merge_json(meta["label_space"])
        self.adapters.load(directory, list(meta["adapters"]), self.space)
        self.skipped.update(meta.get("nonfinite_skipped", {}))

    # ---- mid-task checkpoints ----------------------------------------------------------------------
    # The Trainer's checkpoint already holds every adapter of the PeftModel (generative runs) or the
    # whole PerTaskModel with its heads and router (classifier runs), plus the optimizer and the RNG
    # states. Outside it the method keeps only the count of skipped non-finite micro-batches.
    def save_checkpoint(self, model, directory: Path) -> None:
        if PartialState().is_main_process:
            atomic_write_json(
                Path(directory) / CHECKPOINT_FILE, {"format": 1, "nonfinite_skipped": self.skipped}
            )

    def load_checkpoint(self, model, directory: Path) -> None:
        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            raise ModelError(
                "this checkpoint has no state of the peft method (written by another method?); delete the "
                "checkpoint folder to restart the task",
                source=str(path),
            )
        self.skipped = dict(json.loads(path.read_text())["nonfinite_skipped"])
