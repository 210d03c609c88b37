"""Batched greedy generation and exact-match scoring."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from retain.data.prompt import PromptBuilder, normalize_answer, pad_batch
from retain.data.tasks import TaskData

#: A shared prompt prefix shorter than this is not worth a separate pass.
MIN_SHARED_PREFIX = 8


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving at least one token of each prompt to feed."""
    if not prompts:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _supports_prefix_cache(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return not (config is not None and config.is_prompt_learning)  # virtual tokens come before the prompt


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus every end token of the model's generation config (end-of-turn tokens)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    ids = [tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    desc: str = "eval",
    share_prefix: bool = True,
) -> list[str]:
    """Greedy answers for token-id prompts: stop at EOS, longest prompts batched first.

    The prompt prefix that every row shares (system prompt, instruction) is run once and its
    KV cache reused by every batch (`share_prefix`); each batch then holds the prefix, left
    padding, and the rows' own tokens. With several processes, each generates a slice and every
    process gets all answers back.
    """
    state = PartialState()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shared = common_prefix_length(prompts) if share_prefix and _supports_prefix_cache(model) else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    prefix = torch.tensor([prompts[0][:shared]], device=device) if shared else None
    prefix_cache = model(input_ids=prefix, use_cache=True).past_key_values if shared else None
    mine: list[tuple[int, str]] = []
    with state.split_between_processes(order) as local:
        batches = [local[s : s + batch_size] for s in range(0, len(local), batch_size)]
        for batch_ids in tqdm(batches, desc=desc, leave=False, disable=not state.is_local_main_process):
            batch = pad_batch(
                [{"input_ids": prompts[i][shared:]} for i in batch_ids],
                tokenizer.pad_token_id,
                "left",
                ("input_ids",),
            )
            input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            cache = None
            if prefix_cache is not None:
                rows = len(batch_ids)
                input_ids = torch.cat([prefix.expand(rows, -1), input_ids], dim=1)
                mask = torch.cat([torch.ones(rows, shared, dtype=mask.dtype, device=device), mask], dim=1)
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(rows)
            output = model.generate(
                input_ids=input_ids, attention_mask=mask, cache=cache, generation_config=config
            )
            texts = tokenizer.batch_decode(output[:, input_ids.size(1) :], skip_special_tokens=True)
            mine.extend(zip(batch_ids, texts, strict=True))
    if was_training:
        model.train()
    pairs = gather_object(mine) if state.num_processes > 1 else mine
    answers = [""] * len(prompts)
    for index, text in pairs:
        answers[index] = text
    return answers


@dataclass
class Score:
    """One matrix entry: a score in [0, 1] (accuracy, or F1 for word-level tasks) and its counts."""

    accuracy: float
    correct: int
    scored: int
    #: Test rows whose gold answer is not in the task's label set (for example MNLI's "-"): not scored.
    unlabeled: int
    #: Per test row, the predicted answer (written to predictions/ for inspection), when available.
    predictions: list[str] | None = None
    #: Further named figures of this entry, each in [0, 1] (for example a router's task-identification
    #: accuracy). The task loop keeps one matrix per name next to the main one (`extra_matrices`).
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalContext:
    """What an evaluation hook may use besides the model and the task's data."""

    tokenizer: PreTrainedTokenizerBase
    builder: PromptBuilder
    batch_size: int
    #: The user's max_new_tokens; None: the task's longest train answer + 1 (answer ids include EOS).
    max_new_tokens: int | None
    #: Reuse the KV cache of the prompt prefix all test rows share.
    share_prefix: bool = True

    def new_tokens_for(self, data: TaskData) -> int:
        if self.max_new_tokens:
            return self.max_new_tokens
        return max(len(self.builder.answer_ids(e.answer)) for e in data.train) + 1


def generative_score(model: torch.nn.Module, data: TaskData, ctx: EvalContext, desc: str = "eval") -> Score:
    """Greedy answers to the task's test prompts, scored by normalised exact match."""
    prompts = [ctx.builder.prompt_ids(e) for e in data.test]
    answers = generate_answers(
        model, ctx.tokenizer, prompts, ctx.batch_size, ctx.new_tokens_for(data), desc=desc
    )
    result = score(answers, [e.answer for e in data.test], data.labels)
    result.predictions = answers
    return result


def score(predictions: list[str], answers: list[str], labels: list[str] | None) -> Score:
    correct = scored = unlabeled = 0
    label_set = set(labels) if labels is not None else None
    for prediction, answer in zip(predictions, answers, strict=True):
        gold = normalize_answer(answer)
        if label_set is not None and gold not in label_set:
            unlabeled += 1
            continue
        scored += 1
        correct += normalize_answer(prediction) == gold
    if scored == 0:
        raise ValueError("no test row has a gold answer in the task's label set")
    return Score(accuracy=correct / scored, correct=correct, scored=scored, unlabeled=unlabeled)
