"""Batched greedy generation and exact-match scoring."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from retain.data.prompt import PromptBuilder, normalize_answer, pad_batch
from retain.data.tasks import TaskData
from retain.eval.scoring import Score, score

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


def supports_prefix_cache(model: torch.nn.Module) -> bool:
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


def batch_cache(model: torch.nn.Module, prefix_cache, rows: int, max_cache_len: int, static: bool = True):
    """A cache for `rows` rows that starts with the shared prefix's keys and values.

    A preallocated `StaticCache` of `max_cache_len` tokens when every layer of the model is a plain
    full-attention layer: each decode step then writes one position instead of concatenating the whole
    cache (0.77x the time on a 694-token few-shot prefix: `retain bench write`). Otherwise (sliding windows,
    other cache types), or with `static` false, a copy of the prefix's `DynamicCache`, repeated per row.
    """
    if static and all(type(layer) is DynamicLayer for layer in prefix_cache.layers):
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        if len(cache.layers) == len(prefix_cache.layers) and all(
            type(x) is StaticLayer for x in cache.layers
        ):
            for layer, prefix in zip(cache.layers, prefix_cache.layers, strict=True):
                keys = prefix.keys.expand(rows, -1, -1, -1)
                values = prefix.values.expand(rows, -1, -1, -1)
                layer.lazy_initialization(keys, values)
                length = keys.size(2)
                layer.keys[:, :, :length] = keys
                layer.values[:, :, :length] = values
                layer.cumulative_length.fill_(length)
            return cache
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(rows)
    return cache


@dataclass(frozen=True)
class Sampling:
    """Sampled instead of greedy generation, reproducible: batch k is drawn with the seed `seed + k` in a
    private random state (the global torch generators are left as they were)."""

    temperature: float = 1.0
    top_p: float = 1.0
    #: Keep the k most likely tokens only; 0: no top-k filter.
    top_k: int = 0
    seed: int = 0


def _batches(
    state: PartialState, order: list[int], batch_size: int, whole: bool
) -> list[tuple[int, list[int]]]:
    """(batch number, row indices) of the batches this process generates.

    Greedy: the rows are split over the processes, then batched. `whole` (sampling): the batches are
    formed over all rows and numbered first, then split, so each batch and its seed are the same
    whatever the number of processes.
    """
    if whole:
        numbered = list(enumerate(order[s : s + batch_size] for s in range(0, len(order), batch_size)))
        with state.split_between_processes(numbered) as local:
            return list(local)
    with state.split_between_processes(order) as local:
        return list(enumerate(local[s : s + batch_size] for s in range(0, len(local), batch_size)))


@contextlib.contextmanager
def _seeded(sampling: Sampling | None, number: int, device: torch.device) -> Iterator[None]:
    if sampling is None:
        yield
        return
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(sampling.seed + number)
        yield


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    desc: str = "eval",
    share_prefix: bool = True,
    sampling: Sampling | None = None,
    return_finished: bool = False,
    static_prefix: bool = True,
) -> list[str] | tuple[list[str], list[bool]]:
    """Greedy answers for token-id prompts: stop at EOS, longest prompts batched first.

    The prompt prefix that every row shares (system prompt, instruction) is run once and its
    KV cache reused by every batch (`share_prefix`); each batch then holds the prefix, left
    padding, and the rows' own tokens. With several processes, each generates a slice and every
    process gets all answers back. `sampling` samples instead (see `Sampling`); `return_finished`
    also returns, per prompt, whether its answer ended with a stop token (False: cut at
    `max_new_tokens`). `static_prefix` false repeats the prefix's dynamic cache instead of copying it
    into a preallocated one (`batch_cache`; `retain bench write` compares the two).
    """
    state = PartialState()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    stops = stop_token_ids(model, tokenizer)
    options = {}
    if sampling is not None:
        options = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling is not None,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        disable_compile=True,  # on a GPU a static cache would compile the model again for every batch shape
        **options,
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shared = common_prefix_length(prompts) if share_prefix and supports_prefix_cache(model) else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    prefix = torch.tensor([prompts[0][:shared]], device=device) if shared else None
    prefix_cache = model(input_ids=prefix, use_cache=True).cache if shared else None
    mine: list[tuple[int, str, bool]] = []
    batches = _batches(state, order, batch_size, whole=sampling is not None)
    for number, batch_ids in tqdm(batches, desc=desc, leave=False, disable=not state.is_local_main_process):
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
            cache = batch_cache(model, prefix_cache, rows, input_ids.size(1) + max_new_tokens, static_prefix)
        with _seeded(sampling, number, device):
            output = model.generate(
                input_ids=input_ids, attention_mask=mask, cache=cache, generation_config=config
            )
        new_tokens = output[:, input_ids.size(1) :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        ended = [any(token in stops for token in row) for row in new_tokens.tolist()]
        mine.extend(zip(batch_ids, texts, ended, strict=True))
    if was_training:
        model.train()
    triples = gather_object(mine) if state.num_processes > 1 else mine
    answers, finished = [""] * len(prompts), [False] * len(prompts)
    for index, text, ended in triples:
        answers[index], finished[index] = text, ended
    return (answers, finished) if return_finished else answers


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
    #: 'generate' (greedy answers), 'choice' (the most likely label, retain.eval.choice) or 'both'
    #: (generate for the matrix, with choice's accuracy and the two modes' agreement as extra figures).
    mode: str = "generate"
    #: choice: 'sum' or 'mean' (per token) of the label tokens' log-likelihoods.
    choice_normalization: str = "sum"

    def new_tokens_for(self, data: TaskData) -> int:
        if self.max_new_tokens:
            return self.max_new_tokens
        return max(len(self.builder.answer_ids(e.answer)) for e in data.train) + 1


def generative_score(model: torch.nn.Module, data: TaskData, ctx: EvalContext, desc: str = "eval") -> Score:
    """The task's test rows answered by the model, scored (`retain.eval.scoring`): greedy answers, or with
    `ctx.mode` 'choice' the most likely label (tasks without a label set are always generated)."""
    from retain.eval.choice import choice_predictions

    gold = [e.answer for e in data.test]
    if ctx.mode == "choice" and data.labels:
        chosen = choice_predictions(model, data, ctx, desc=desc)
        result = score(chosen, gold, data.labels)
        result.predictions = chosen
        return result
    prompts = [ctx.builder.prompt_ids(e) for e in data.test]
    answers = generate_answers(
        model, ctx.tokenizer, prompts, ctx.batch_size, ctx.new_tokens_for(data), desc=desc
    )
    result = score(answers, gold, data.labels)
    result.predictions = answers
    if ctx.mode == "both" and data.labels:
        chosen = choice_predictions(model, data, ctx, desc=desc)
        result.extra.update(choice_figures(answers, chosen, gold, data.labels))
    return result


def choice_figures(
    answers: list[str], chosen: list[str], gold: list[str], labels: list[str]
) -> dict[str, float]:
    """With `eval_mode: both`: choice's accuracy, and how often the two modes name the same label (over
    the scored rows)."""
    choice = score(chosen, gold, labels)
    rows = [
        (a, c) for a, c, g in zip(answers, chosen, gold, strict=True) if normalize_answer(g) in set(labels)
    ]
    agree = sum(normalize_answer(a) == normalize_answer(c) for a, c in rows) / len(rows)
    return {"choice_accuracy": choice.accuracy, "mode_agreement": agree}
