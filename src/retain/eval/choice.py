"""`eval_mode: choice`: score each label by the log-likelihood of its tokens after the prompt.

This is lm-evaluation-harness's multiple-choice protocol: the model picks the label whose tokens
(the label text as the model was trained to write it, without the end token) are most likely after
the prompt, summed over the tokens (`choice_normalization: sum`) or averaged per token (`mean`). It
asks whether the model still *knows* the answer, whatever format it would generate.

Work is shared the way generation shares it: the prompt prefix common to every test row runs once
and its KV cache is reused; each batch of rows then runs its prompts once, and all the labels of
every row are scored against that batch's cache in one more pass (rows x labels continuations).
Positions follow each row's real length (left padding does not shift them).
"""

from __future__ import annotations

import copy

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from retain.data.prompt import pad_batch
from retain.errors import ConfigError
from retain.eval.predict import MIN_SHARED_PREFIX, common_prefix_length, supports_prefix_cache


def pick(scores: list[float], lengths: list[int], normalization: str) -> int:
    """The index of the best choice: highest summed log-likelihood, or highest per-token mean."""
    if normalization == "mean":
        values = [s / max(n, 1) for s, n in zip(scores, lengths, strict=True)]
    else:
        values = list(scores)
    return max(range(len(values)), key=values.__getitem__)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def choice_log_likelihoods(
    model: torch.nn.Module,
    prompts: list[list[int]],
    choices: list[list[int]],
    pad_id: int,
    batch_size: int,
    share_prefix: bool = True,
    desc: str = "choice",
) -> list[list[float]]:
    """For every prompt, the summed log-probability of each choice's tokens after it ([rows][choices])."""
    if not supports_prefix_cache(model):
        raise ConfigError(
            "eval_mode choice needs the prompt first; prompt-tuning adapters put it after", field="eval_mode"
        )
    if any(not c for c in choices):
        raise ValueError("every choice needs at least one token")
    state = PartialState()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    shared = common_prefix_length(prompts) if share_prefix else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    prefix_cache = None
    if shared:
        prefix = torch.tensor([prompts[0][:shared]], device=device)
        prefix_cache = model(input_ids=prefix, use_cache=True).past_key_values
    width = max(len(c) for c in choices)
    choice_ids = torch.tensor([c + [pad_id] * (width - len(c)) for c in choices], device=device)
    choice_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in choices], device=device)
    count = len(choices)
    mine: list[tuple[int, list[float]]] = []
    with state.split_between_processes(order) as local:
        batches = [local[s : s + batch_size] for s in range(0, len(local), batch_size)]
        for batch_ids in tqdm(batches, desc=desc, leave=False, disable=not state.is_local_main_process):
            rows = len(batch_ids)
            batch = pad_batch(
                [{"input_ids": prompts[i][shared:]} for i in batch_ids], pad_id, "left", ("input_ids",)
            )
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(rows)
                mask = torch.cat([torch.ones(rows, shared, dtype=mask.dtype, device=device), mask], dim=1)
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=_positions(mask)[:, -ids.size(1) :],
                past_key_values=cache,
                use_cache=True,
            )
            first = torch.log_softmax(
                out.logits[:, -1].float(), dim=-1
            )  # [rows, vocab]: each choice's 1st token
            cache = out.past_key_values
            cache.batch_repeat_interleave(count)
            full_mask = torch.cat([mask.repeat_interleave(count, 0), choice_mask.repeat(rows, 1)], dim=1)
            lengths = mask.sum(-1).repeat_interleave(count)  # each row's real prompt length
            steps = torch.arange(width, device=device)
            follow = model(
                input_ids=choice_ids.repeat(rows, 1),
                attention_mask=full_mask,
                position_ids=lengths[:, None] + steps[None, :],
                past_key_values=cache,
            )
            logp = torch.log_softmax(follow.logits[:, :-1].float(), dim=-1)  # token j+1 given tokens <= j
            targets = choice_ids.repeat(rows, 1)
            later = logp.gather(-1, targets[:, 1:, None]).squeeze(-1) * choice_mask.repeat(rows, 1)[:, 1:]
            head = first.repeat_interleave(count, 0).gather(-1, targets[:, :1]).squeeze(-1)
            totals = (head + later.sum(-1)).view(rows, count)
            mine.extend(zip(batch_ids, totals.tolist(), strict=True))
    if was_training:
        model.train()
    pairs = gather_object(mine) if state.num_processes > 1 else mine
    result: list[list[float]] = [[] for _ in prompts]
    for index, values in pairs:
        result[index] = values
    return result


def choice_predictions(model, data, ctx, desc: str = "choice") -> list[str]:
    """The label each test row's prompt makes most likely (the label texts as the task's label_list writes them)."""
    if not data.label_texts:
        raise ValueError(f"task '{data.name}' has no label set to choose from")
    prompts = [ctx.builder.prompt_ids(e) for e in data.test]
    # The tokens the model was trained to write for each label, without the end token.
    choices = [ctx.builder.answer_ids(label)[:-1] for label in data.label_texts]
    lengths = [len(c) for c in choices]
    scores = choice_log_likelihoods(
        model, prompts, choices, ctx.tokenizer.pad_token_id, ctx.batch_size, ctx.share_prefix, desc=desc
    )
    return [data.label_texts[pick(row, lengths, ctx.choice_normalization)] for row in scores]
