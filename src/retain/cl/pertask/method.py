"""`peft`: one adapter per task on a frozen backbone (seed 004), with optional classifier heads.

Task t trains only its own adapter `task-{t}` (LoRA or a soft prompt), its own head (when a
classifier is set) and, with NewLoRA, the shared task router. Every other task's adapter and
head is frozen and stays bit-identical. See docs/methods/peft.md for the whole design.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from retain.cl.base import CLMethod, Task
from retain.cl.loss import causal_lm_loss, shifted_targets, token_ce_sum
from retain.cl.pertask import SPEC
from retain.cl.pertask.config import PEFTArguments
from retain.cl.pertask.heads import drop_virtual, make_head, pool
from retain.cl.pertask.labels import LabelSpace, map_word_targets
from retain.cl.pertask.router import TaskRouter, preference_sum, route
from retain.cl.pertask.tagging import encode_words, entity_f1
from retain.data.prompt import IGNORE_INDEX, normalize_answer, pad_batch
from retain.errors import ConfigError, DataError, ModelError, TrainingError
from retain.eval.predict import Score, generative_score
from retain.io import atomic_write_json
from retain.model.adapters import ADAPTER_WEIGHTS, adapter_parameters, load_adapter_weights, lora_config

logger = logging.getLogger(__name__)

STATE_FILE = "pertask.json"
HEAD_FILE = "head.safetensors"
HEAD_CONFIG = "head.json"
ROUTER_FILE = "router.safetensors"
#: Mid-task checkpoint file (next to the Trainer's in `checkpoint-N/`).
CHECKPOINT_FILE = "pertask_checkpoint.json"
#: Engine LoRA keys that this method replaces by the seed's PEFT_lora_* keys.
ENGINE_LORA_KEYS = {
    "lora_rank": "PEFT_lora_r",
    "lora_alpha": "PEFT_lora_alpha",
    "lora_dropout": "PEFT_lora_dropout",
}
# Offsets that make the seeded initialisations of different parts independent.
_ADAPTER_SALT, _HEAD_SALT, _ROUTER_SALT, _FRESH_SALT = 11, 23, 37, 41


def adapter_name(index: int) -> str:
    return f"task-{index}"


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run an initialisation with its own seed, leaving the global random state untouched."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class PerTaskModel(nn.Module):
    """The adapter-wrapped backbone plus the per-task heads and the router, as one module.

    The Trainer optimises every parameter that requires grad, so heads and router must live in
    the module it trains; checkpoints hold them too.
    """

    loss_type = None  # the Trainer must not shift labels when it counts them

    def __init__(self, backbone: PeftModel):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        self.router: TaskRouter | None = None

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask)


class HeadCollator:
    """Right-pads classification rows; sentence labels are one index per row, word labels one per token."""

    def __init__(self, pad_id: int, word_level: bool):
        self.pad_id = pad_id
        self.word_level = word_level

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.word_level:
            return pad_batch(rows, self.pad_id, side="right", keys=("input_ids", "labels"))
        batch = pad_batch(rows, self.pad_id, side="right", keys=("input_ids",))
        batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=torch.long)
        return batch


class _StepTracker(TrainerCallback):
    def __init__(self, method: PerTaskPEFT):
        self.method = method

    def on_step_begin(self, args, state, control, **kwargs):
        self.method.step = state.global_step + 1


@dataclasses.dataclass
class _TestRows:
    input_ids: list[list[int]]
    #: sentence level: the gold class index in the task's labels (-1: not a label, not scored);
    #: word level: the first-token position of every word (-1: cut away)
    targets: list[Any]


class PerTaskPEFT(CLMethod):
    spec = SPEC
    task_dir_pattern = "lora_task_{index}"

    def __init__(self, config):
        super().__init__(config)
        self.args: PEFTArguments
        for key, ours in ENGINE_LORA_KEYS.items():
            if key in config.values:
                raise ConfigError(f"cl_method peft sets this through '{ours}'", field=key)
        self.space = LabelSpace(self.args.classification_type) if self.args.uses_heads else None
        self.peft: PeftModel | None = None
        self.model: PerTaskModel | None = None
        self.data: dict[str, Any] = {}
        self.current: Task | None = None
        self.train_index: int | None = None
        self.step = 0
        self.skipped: dict[str, int] = {}
        self.encoder_style = False
        self.pooling = self.args.pooling
        self.cutoff_len = 1024
        self._tests: dict[str, _TestRows] = {}

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def prompt_tuning(self) -> bool:
        return self.args.PEFT_type == "PromptTuning"

    @property
    def num_virtual(self) -> int:
        return self.args.PEFT_num_virtual_tokens if self.prompt_tuning else 0

    def _seed(self, index: int, salt: int) -> int:
        return self.config.training.seed * 100_003 + index * 1_009 + salt

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

    def _device(self) -> torch.device:
        return next(self.peft.parameters()).device

    # ---- model and data ----------------------------------------------------------------------
    def model_kind(self) -> str:
        return "encoder" if self.args.uses_heads else "causal-lm"

    def collator(self, tokenizer):
        if not self.args.uses_heads:
            return super().collator(tokenizer)
        return HeadCollator(tokenizer.pad_token_id, self.args.word_level)

    def encode_task(self, data, builder, cutoff_len: int) -> None:
        self.data[data.name] = data
        self.cutoff_len = cutoff_len
        if not self.args.uses_heads:
            super().encode_task(data, builder, cutoff_len)
            return
        self.builder = builder
        self.encoder_style = builder.tokenizer.cls_token_id is not None
        if self.args.pooling == "auto":
            self.pooling = "cls" if self.encoder_style else "last"
        labels = self._own_labels(data)
        self.space.set_task(self._index_of(data.name), data.name, labels)
        position = {label: i for i, label in enumerate(labels)}
        rows, dropped, truncated = [], 0, 0
        for example in data.train:
            if self.args.word_level:
                ids, starts = self._word_ids(example)
                row_labels = [IGNORE_INDEX] * len(ids)
                for tag, start in zip(example.extra["tags"], starts, strict=True):
                    if start >= 0:
                        row_labels[start] = position[tag]
                truncated += min(starts) < 0
                if all(label == IGNORE_INDEX for label in row_labels):
                    dropped += 1
                    continue
                rows.append({"input_ids": ids, "labels": row_labels})
            else:
                ids, cut = self._sentence_ids(example)
                truncated += cut
                gold = position.get(normalize_answer(example.answer))
                if gold is None:
                    dropped += 1
                    continue
                rows.append({"input_ids": ids, "labels": gold})
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

    def _own_labels(self, data) -> list[str]:
        if self.args.word_level:
            if data.tags is None:
                raise DataError(
                    f"task '{data.name}' is not a word-level task: word-level classification needs "
                    "`formatting: tagging` data",
                    field="classification_type",
                )
            return list(data.tags)
        if data.tags is not None:
            raise DataError(
                f"task '{data.name}' is a tagging task: set classification_type: word-level",
                field="classification_type",
            )
        if data.labels is None:
            raise DataError(
                f"task '{data.name}' has too many distinct answers to be a classification task; "
                "give its classes in a `label_list` of its dataset_info.json entry",
                field=data.name,
            )
        return list(data.labels)

    def _sentence_ids(self, example) -> tuple[list[int], bool]:
        """Encoders: [CLS] text [SEP] cut from the right; decoders: the prompt cut from the left (its end is the feature)."""
        tokenizer = self.builder.tokenizer
        if self.encoder_style:
            parts = ([example.system] if example.system else []) + [m["content"] for m in example.messages]
            full = tokenizer("\n".join(parts), add_special_tokens=True)["input_ids"]
            if len(full) <= self.cutoff_len:
                return full, False
            cut = tokenizer(
                "\n".join(parts), add_special_tokens=True, truncation=True, max_length=self.cutoff_len
            )["input_ids"]
            return cut, True
        ids = self.builder.prompt_ids(example)
        return ids[-self.cutoff_len :], len(ids) > self.cutoff_len

    def _word_ids(self, example) -> tuple[list[int], list[int]]:
        return encode_words(
            self.builder.tokenizer, example.extra["tokens"], self.encoder_style, self.cutoff_len
        )

    def _test_rows(self, data) -> _TestRows:
        if data.name not in self._tests:
            ids, targets = [], []
            labels = {label: i for i, label in enumerate(self._own_labels(data))}
            for example in data.test:
                if self.args.word_level:
                    row, starts = self._word_ids(example)
                    ids.append(row)
                    targets.append(starts)
                else:
                    ids.append(self._sentence_ids(example)[0])
                    targets.append(labels.get(normalize_answer(example.answer), -1))
            self._tests[data.name] = _TestRows(ids, targets)
        return self._tests[data.name]

    # ---- adapters, heads, router ---------------------------------------------------------------
    def _adapter_config(self):
        args = self.args
        task_type = "FEATURE_EXTRACTION" if args.uses_heads else "CAUSAL_LM"
        if self.prompt_tuning:
            return PromptTuningConfig(
                task_type=task_type,
                num_virtual_tokens=args.PEFT_num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.RANDOM,
            )
        finetuning = dataclasses.replace(
            self.config.finetuning,
            lora_rank=args.PEFT_lora_r,
            lora_alpha=float(args.PEFT_lora_alpha),
            lora_dropout=args.PEFT_lora_dropout,
        )
        return lora_config(finetuning, task_type=task_type)

    def _add_adapter(self, index: int, base: nn.Module | None = None) -> None:
        name = adapter_name(index)
        with _seeded(self._seed(index, _ADAPTER_SALT)):
            try:
                if base is not None:
                    self.peft = get_peft_model(base, self._adapter_config(), adapter_name=name)
                else:
                    self.peft.add_adapter(name, self._adapter_config())
            except ValueError as exc:
                raise ModelError(f"cannot add adapter {name}: {exc}", field="lora_target") from None
        if self.prompt_tuning:
            self._init_prompt(index)

    def _init_text(self, index: int) -> str | None:
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

    def _init_prompt(self, index: int) -> None:
        """Soft prompt = the word embeddings of the init text, repeated or cut to the prompt length."""
        text = self._init_text(index)
        if text is None:
            return
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(
                f"the prompt init text {text!r} has no tokens", field="PEFT_prompt_tuning_init_text"
            )
        count = self.args.PEFT_num_virtual_tokens
        ids = (ids * math.ceil(count / len(ids)))[:count]
        weight = self.peft.prompt_encoder[adapter_name(index)].embedding.weight
        words = self.peft.word_embeddings
        embeddings = words(torch.tensor(ids, device=words.weight.device))
        with torch.no_grad():
            weight.copy_(embeddings.detach().to(weight.device, weight.dtype))

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        if self.prompt_tuning:
            return list(self.peft.prompt_encoder[name].parameters())
        return list(adapter_parameters(self.peft, name).values())

    def _new_head(self, out_features: int, seed: int) -> nn.Module:
        with _seeded(seed):
            head = make_head(
                self.args.classifier, self.peft.config.hidden_size, out_features, self.args.cosine_scale
            )
        return head.to(self._device())

    def _ensure_head(self, index: int) -> None:
        key = adapter_name(index)
        if key not in self.model.heads:
            self.model.heads[key] = self._new_head(
                len(self.space.head_labels(index)), self._seed(index, _HEAD_SALT)
            )

    def _apply_trainable(self, index: int | None) -> None:
        """Exactly task `index`'s adapter and head (and the router) require grad; None freezes everything."""
        self.train_index = index
        active = None if index is None else adapter_name(index)
        for name in self.peft.peft_config:
            for param in self.adapter_params(name):
                param.requires_grad_(name == active)
        if self.model is not None:
            for key, head in self.model.heads.items():
                head.requires_grad_(key == active)
            if self.model.router is not None:
                self.model.router.requires_grad_(index is not None)

    @contextlib.contextmanager
    def _adapter(self, index: int) -> Iterator[None]:
        """Make task `index`'s adapter the active one for a forward pass, then restore."""
        name = adapter_name(index)
        if name not in self.peft.peft_config:
            raise ModelError(f"no adapter for task {index + 1} ({name})")
        previous = self.peft.active_adapter
        if previous == name:
            yield
            return
        self.peft.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            self.peft.set_adapter(previous)
            self._apply_trainable(self.train_index)

    def prepare_model(self, model, tokenizer):
        self.tokenizer = tokenizer
        first = self.tasks[0].index if self.tasks else 0
        if not self.args.uses_heads:
            self._add_adapter(first, base=model)
            self._apply_trainable(None)
            return self.peft
        self.encoder_style = tokenizer.cls_token_id is not None
        if self.args.pooling == "auto":
            self.pooling = "cls" if self.encoder_style else "last"
        # Heads read hidden states: drop a causal LM's output layer (`base_model` is the bare transformer).
        backbone = getattr(model, "base_model", model)
        self._add_adapter(first, base=backbone)
        self.model = PerTaskModel(self.peft)
        if self.args.uses_router:
            num_task = max(t.index for t in self.tasks) + 1 if self.tasks else 1
            with _seeded(self._seed(0, _ROUTER_SALT)):
                self.model.router = TaskRouter(self.peft.config.hidden_size, num_task)
        self._apply_trainable(None)
        return self.model

    def begin_task(self, model, task: Task, data) -> None:
        self.current = task
        name = adapter_name(task.index)
        if name not in self.peft.peft_config:
            self._add_adapter(task.index)
        self.peft.set_adapter(name)
        if self.args.uses_heads:
            self._ensure_head(task.index)
            if self.args.word_level:
                self._own_global = torch.tensor(self.space.own_to_global(task.index))
        self._apply_trainable(task.index)

    def callbacks(self, model):
        return [_StepTracker(self)]

    def end_task(self, model, task: Task, data) -> None:
        self._apply_trainable(None)
        skipped = self.skipped.get(task.name, 0)
        if skipped:
            logger.warning(
                "task %s: %d micro-batches with a non-finite loss were skipped", task.name, skipped
            )

    # ---- training -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, scale):
        if self.args.uses_heads:
            loss = self._head_loss(model, inputs, scale, self.current.index)
        elif self.prompt_tuning:
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
            logits_to_keep=keep + self.num_virtual,
        )
        return token_ce_sum(out.logits, targets)

    def _head_loss(self, model, inputs, scale, t: int) -> torch.Tensor:
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        weights = None
        if self.args.uses_router:  # before the adapter pass: disabling adapters toggles requires_grad
            weights = model.router(self._router_features(ids, mask))
        logits = self._head_logits(model, t, ids, mask)
        if self.args.word_level:
            if t > 0:
                logits = torch.cat([self._o_logits(model, ids, mask), logits], dim=-1)
            own_global = self._own_global.to(labels.device)  # the Trainer may move the model after begin_task
            glob = torch.where(labels == IGNORE_INDEX, labels, own_global[labels.clamp(min=0)])
            targets = map_word_targets(glob, t, self.space.accum(t), self.space.pre_accum(t))
        else:
            targets = labels
        loss = scale.token_mean(*token_ce_sum(logits, targets))
        if weights is not None:
            rows = ids.size(0)
            preference = preference_sum(weights, t)
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

    # ---- features ---------------------------------------------------------------------------------
    def _hidden(self, ids, mask, index: int | None) -> tuple[torch.Tensor, int]:
        """Last hidden states with task `index`'s adapter, or with no adapter at all (None)."""
        if index is None:
            if self.prompt_tuning:  # the bare backbone: no soft prompt
                return self.peft.base_model(input_ids=ids, attention_mask=mask).last_hidden_state, 0
            with self.peft.disable_adapter():
                return self.peft(input_ids=ids, attention_mask=mask).last_hidden_state, 0
        with self._adapter(index):
            return self.peft(input_ids=ids, attention_mask=mask).last_hidden_state, self.num_virtual

    def _features(self, hidden, mask, num_virtual: int) -> torch.Tensor:
        if self.args.word_level:
            return drop_virtual(hidden, mask, num_virtual)
        return pool(hidden, mask, self.pooling, num_virtual)

    def _head_logits(self, model, index: int, ids, mask) -> torch.Tensor:
        hidden, virtual = self._hidden(ids, mask, index)
        return model.heads[adapter_name(index)](self._features(hidden, mask, virtual))

    @torch.no_grad()
    def _o_logits(self, model, ids, mask) -> torch.Tensor:
        """The "O" logit of word-level tasks after the first: task 0's adapter and head, no grad."""
        with _eval_mode(self.peft):
            return self._head_logits(model, 0, ids, mask)[..., :1]

    @torch.no_grad()
    def _router_features(self, ids, mask) -> torch.Tensor:
        """Pooled features of the backbone with every adapter disabled: the same for every task."""
        with _eval_mode(self.peft):
            hidden, _ = self._hidden(ids, mask, None)
        return pool(hidden, mask, self.pooling, 0)

    def _til_logits(self, model, index: int, ids, mask) -> torch.Tensor:
        logits = self._head_logits(model, index, ids, mask)
        if self.args.word_level and index > 0:
            logits = torch.cat([self._o_logits(model, ids, mask), logits], dim=-1)
        return logits

    # ---- evaluation ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation(self, model, trained: Task | None, evaluated: Task) -> Iterator[None]:
        if self.args.uses_heads:  # `evaluate` picks adapters and heads itself
            yield
            return
        if trained is None or (self.args.il_mode == "TIL" and evaluated.index > trained.index):
            with self.peft.disable_adapter():
                yield
            self._apply_trainable(self.train_index)
            return
        target = trained.index if self.args.il_mode == "CIL" else evaluated.index
        with self._adapter(target):
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
        if trained is None or i > trained.index:
            mode, k = "fresh", i
        else:
            k = trained.index
            mode = (
                "til"
                if self.args.il_mode == "TIL"
                else ("hard" if self.args.newlora_routing == "hard" else "all")
            )
        rows = self._test_rows(data)
        predictions, chosen = self._predict_rows(model, mode, i, k, rows.input_ids, ctx.batch_size)
        upto = max(i, k)
        glob = self.space.global_labels(upto)
        extra: dict[str, float] = {}
        if chosen is not None:
            extra["router_accuracy"] = sum(c == i for c in chosen) / len(chosen)
        if self.args.word_level:
            return self._word_score(data, rows, predictions, glob, extra)
        pre = self.space.pre_accum(i)[i]
        correct = scored = 0
        texts = []
        for gold, g in zip(rows.targets, predictions, strict=True):
            owner, text = glob[g]
            texts.append(text if owner == i else f"{self.space.names[owner]}:{text}")
            if gold >= 0:
                scored += 1
                correct += g == pre + gold
        if scored == 0:
            raise DataError(f"task '{data.name}': no test row has a gold answer among the task's labels")
        return Score(
            accuracy=correct / scored,
            correct=correct,
            scored=scored,
            unlabeled=len(rows.targets) - scored,
            predictions=texts,
            extra=extra,
        )

    def _word_score(self, data, rows: _TestRows, predictions, glob, extra) -> Score:
        gold, predicted = [], []
        for example, starts, tokens in zip(data.test, rows.targets, predictions, strict=True):
            gold.append(example.extra["tags"])
            predicted.append([glob[tokens[s]][1] if s >= 0 else "O" for s in starts])
        result = entity_f1(gold, predicted)
        extra.update(entity_precision=result.precision, entity_recall=result.recall)
        return Score(
            accuracy=result.f1,
            correct=result.true_positives,
            scored=len(gold),
            unlabeled=0,
            predictions=[" ".join(p) for p in predicted],
            extra=extra,
        )

    def _predict_rows(
        self, model, mode: str, i: int, k: int, input_ids: list[list[int]], batch_size: int
    ) -> tuple[list[Any], list[int] | None]:
        """Global label index per row (sentence) or per token (word), and the routed task per row."""
        state = PartialState()
        order = sorted(range(len(input_ids)), key=lambda r: len(input_ids[r]), reverse=True)
        device = self._device()
        mine: list[tuple[int, Any, int | None]] = []
        with _eval_mode(model), torch.no_grad(), state.split_between_processes(order) as local:
            for start in range(0, len(local), batch_size):
                batch_rows = local[start : start + batch_size]
                batch = pad_batch(
                    [{"input_ids": input_ids[r]} for r in batch_rows],
                    self.tokenizer.pad_token_id,
                    "right",
                    ("input_ids",),
                )
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                glob, routed = self._predict_batch(model, mode, i, k, ids, mask)
                for j, r in enumerate(batch_rows):
                    value = glob[j, : len(input_ids[r])].tolist() if glob.dim() == 2 else int(glob[j])
                    mine.append((r, value, None if routed is None else int(routed[j])))
        self._apply_trainable(self.train_index)
        pairs = gather_object(mine) if state.num_processes > 1 else mine
        predictions: list[Any] = [None] * len(input_ids)
        routes: list[int] = [0] * len(input_ids)
        for r, value, c in pairs:
            predictions[r] = value
            routes[r] = -1 if c is None else c
        has_routes = any(c is not None for _, _, c in pairs)
        return predictions, routes if has_routes else None

    def _predict_batch(self, model, mode: str, i: int, k: int, ids, mask):
        if mode == "fresh":
            # Not trained yet: the bare backbone and the task's freshly initialised head (chance level).
            head = self._new_head(len(self.space.til_labels(i)), self._seed(i, _FRESH_SALT))
            hidden, _ = self._hidden(ids, mask, None)
            logits = head(self._features(hidden, mask, 0))
            return self._to_global(i, logits.argmax(-1)), None
        if mode == "til":
            return self._to_global(i, self._til_logits(model, i, ids, mask).argmax(-1)), None
        routed = None
        if self.args.uses_router:
            weights = model.router(self._router_features(ids, mask))
            routed = route(weights, k + 1)
        if mode == "all":
            logits = torch.cat([self._head_logits(model, j, ids, mask) for j in range(k + 1)], dim=-1)
            return logits.argmax(-1), routed
        # hard routing: one adapter pass per row, with the task the router picked
        out = None
        for c in routed.unique().tolist():
            rows = routed == c
            glob = self._to_global(c, self._til_logits(model, c, ids[rows], mask[rows]).argmax(-1))
            if out is None:
                out = torch.zeros((ids.size(0), *glob.shape[1:]), dtype=torch.long, device=ids.device)
            out[rows] = glob
        return out, routed

    def _to_global(self, index: int, til: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(self.space.til_to_global(index), device=til.device)
        return table[til]

    # ---- saving and loading ------------------------------------------------------------------------
    def save_task(self, model, task: Task, directory: Path) -> None:
        names = sorted(self.peft.peft_config, key=lambda n: int(n.split("-")[1]))
        self.peft.save_pretrained(str(directory), selected_adapters=names)
        if self.args.uses_heads:
            for name in names:
                index = int(name.split("-")[1])
                head = self.model.heads[name]
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                    str(directory / name / HEAD_FILE),
                )
                spec = {
                    "classifier": self.args.classifier,
                    "in_features": self.peft.config.hidden_size,
                    "out_features": len(self.space.head_labels(index)),
                    "labels": self.space.head_labels(index),
                    "task": self.space.names[index],
                }
                (directory / name / HEAD_CONFIG).write_text(json.dumps(spec, indent=1) + "\n")
            if self.model.router is not None:
                state = {k: v.detach().cpu().contiguous() for k, v in self.model.router.state_dict().items()}
                save_file(state, str(directory / ROUTER_FILE))
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
        names = list(meta["adapters"])
        for name in names:
            if name not in self.peft.peft_config:
                self._add_adapter(int(name.split("-")[1]))
            self._load_adapter(name, directory / name)
        self.peft.set_adapter(names[-1])
        for name in [n for n in self.peft.peft_config if n not in names]:
            self.peft.delete_adapter(name)
        if self.model is not None:
            for name in names:
                self._load_head(name, directory / name)
            for name in [n for n in self.model.heads if n not in names]:
                del self.model.heads[name]
            if self.model.router is not None:
                state = load_file(str(directory / ROUTER_FILE), device=str(self._device()))
                try:
                    self.model.router.load_grown(state)
                except ValueError as exc:
                    raise ModelError(str(exc), source=str(directory / ROUTER_FILE)) from None
        self.skipped.update(meta.get("nonfinite_skipped", {}))
        self._apply_trainable(None)

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

    def _load_adapter(self, name: str, directory: Path) -> None:
        if not self.prompt_tuning:
            load_adapter_weights(self.peft, name, directory)
            return
        path = directory / ADAPTER_WEIGHTS
        if not path.is_file():
            raise ModelError("adapter weights not found", source=str(path))
        state = load_file(str(path))
        weight = self.peft.prompt_encoder[name].embedding.weight
        if set(state) != {"prompt_embeddings"} or state["prompt_embeddings"].shape != weight.shape:
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            raise ModelError(
                f"expected one soft prompt of shape {tuple(weight.shape)}, found {shapes}", source=str(path)
            )
        with torch.no_grad():
            weight.copy_(state["prompt_embeddings"].to(weight.device, weight.dtype))

    def _load_head(self, name: str, directory: Path) -> None:
        spec = json.loads((directory / HEAD_CONFIG).read_text())
        index = int(name.split("-")[1])
        expected = len(self.space.head_labels(index))
        if spec["classifier"] != self.args.classifier or spec["out_features"] != expected:
            raise ModelError(
                f"head {name} is a {spec['classifier']} with {spec['out_features']} classes, expected "
                f"{self.args.classifier} with {expected}",
                source=str(directory),
            )
        head = self._new_head(expected, self._seed(index, _HEAD_SALT))
        head.load_state_dict(load_file(str(directory / HEAD_FILE), device=str(self._device())), strict=True)
        self.model.heads[name] = head
