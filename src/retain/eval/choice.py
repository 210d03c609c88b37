"""`eval_mode: choice`: score each label by the log-likelihood of its tokens after the prompt.

This is lm-evaluation-harness's multiple-choice protocol: the model picks the label whose tokens
(the label text as the model was trained to write it, without the end token) are most likely after
the prompt, summed over the tokens (`choice_normalization: sum`) or averaged per token (`mean`). It
asks whether the model still *knows* the answer, whatever format it would generate.

One forward pass per batch scores every label of every row: the prompt prefix common to every test
row runs once and its KV cache is reused; each row's prompt is followed by all the labels' tokens
packed together, and a custom attention mask lets each label see the prompt and its own earlier
tokens only (so each label is scored as if it alone followed the prompt). Positions follow each
row's real length (left padding does not shift them). Batches are formed by length and bounded in
padding as well as rows (`padding_bounded_batches`). The custom mask needs sdpa or eager attention;
sliding-window layers get it windowed (`model_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import DynamicCache

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


@dataclass(frozen=True)
class ChoiceLayout:
    """Every choice's tokens but its last, packed into one run that follows the prompt.

    A packed token attends to the prompt and to the earlier tokens of its own choice only, so each
    choice is scored as if it alone followed the prompt. Logit row 0 is the prompt's last position
    (it scores every choice's first token); row 1 + i is packed token i (it scores the next token of
    that choice).
    """

    #: The packed tokens, their choice and their place in it (0: the choice's first token).
    tokens: list[int]
    segment: list[int]
    depth: list[int]
    #: For every scored token: the logit row that scores it, its choice and its id.
    rows: list[int]
    owner: list[int]
    target: list[int]


def choice_layout(choices: list[list[int]]) -> ChoiceLayout:
    if any(not c for c in choices):
        raise ValueError("every choice needs at least one token")
    layout = ChoiceLayout([], [], [], [], [], [])
    for k, choice in enumerate(choices):
        start = len(layout.tokens)
        for j, token in enumerate(choice):
            layout.rows.append(0 if j == 0 else start + j)  # token j is scored after token j - 1
            layout.owner.append(k)
            layout.target.append(token)
        layout.tokens.extend(choice[:-1])
        layout.segment.extend([k] * (len(choice) - 1))
        layout.depth.extend(range(len(choice) - 1))
    return layout


def packed_attention_mask(prompt_mask: torch.Tensor, shared: int, layout: ChoiceLayout) -> torch.Tensor:
    """Which keys each query sees ([rows, 1, queries, keys], bool): keys are prefix + prompt + packed tokens.

    `prompt_mask` is the batch's left-padded [rows, prompt] mask (the shared prefix not included).
    Prompt tokens attend causally to the prefix and the real prompt tokens; packed tokens as
    ChoiceLayout says. A padding query attends to itself, so no row of the mask is empty.
    """
    rows, width = prompt_mask.shape
    device = prompt_mask.device
    size = len(layout.tokens)
    real = prompt_mask.bool()
    queries, keys = width + size, shared + width + size
    allowed = torch.zeros(rows, queries, keys, dtype=torch.bool, device=device)
    allowed[:, :, :shared] = True
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed[:, :width, shared : shared + width] = causal & real[:, None, :]
    allowed[:, width:, shared : shared + width] = real[:, None, :]
    segment = torch.tensor(layout.segment, device=device)
    depth = torch.tensor(layout.depth, device=device)
    own = (segment[:, None] == segment[None, :]) & (depth[None, :] <= depth[:, None])
    allowed[:, width:, shared + width :] = own
    diagonal = torch.arange(queries, device=device)
    allowed[:, diagonal, shared + diagonal] = True
    return allowed[:, None]


#: A batch takes another row only while its padding stays within this share of its real tokens.
MAX_PADDING_SHARE = 0.1


def padding_bounded_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of row indices, longest rows first, bounded in rows and in padding.

    A batch holds at most `batch_size` rows, and adds a row only while its padded size (rows x its
    longest row) stays within 1 + MAX_PADDING_SHARE times its real tokens. One long row then no
    longer pads `batch_size - 1` short ones to its length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    real = 0
    for index in order:
        last = batches[-1] if batches else None
        grown = real + lengths[index]
        if (
            last
            and len(last) < batch_size
            and (len(last) + 1) * lengths[last[0]] <= (1 + MAX_PADDING_SHARE) * grown
        ):
            last.append(index)
            real = grown
        else:
            batches.append([index])
            real = lengths[index]
    return batches


def model_masks(
    model: torch.nn.Module, allowed: torch.Tensor, query_positions: torch.Tensor, shared: int
) -> torch.Tensor | dict[str, torch.Tensor]:
    """`allowed` as the model's attention takes it: sliding-window layers also drop keys a window away.

    A model with both full and sliding-window layers (Gemma-2, Qwen2 with use_sliding_window) takes
    one mask per kind of layer; one whose every layer slides (Mistral, Phi-3) takes the windowed mask.
    Eager attention adds the mask to the scores, so it gets 0 / -inf in the model's dtype.
    """
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in ("sdpa", "eager"):
        raise ConfigError(
            f"eval_mode choice scores the labels with a custom attention mask, which {implementation} "
            "cannot take: use flash_attn sdpa",
            field="flash_attn",
        )
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    def as_taken(mask: torch.Tensor) -> torch.Tensor:
        if implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )

    window = getattr(config, "sliding_window", None)
    if not window:
        return as_taken(allowed)
    prefix = torch.arange(shared, device=allowed.device).expand(allowed.size(0), -1)
    key_positions = torch.cat([prefix, query_positions], dim=1)
    near = (query_positions[:, :, None] - key_positions[:, None, :]) < window
    windowed = allowed & near[:, None]
    kinds = set(getattr(config, "layer_types", None) or ())
    if "full_attention" in kinds:
        return {"full_attention": as_taken(allowed), "sliding_attention": as_taken(windowed)}
    return as_taken(windowed)


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
    layout = choice_layout(choices)
    state = PartialState()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shared = common_prefix_length(prompts) if share_prefix else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    prefix_layers = None
    if shared:
        prefix = torch.tensor([prompts[0][:shared]], device=device)
        # A plain cache keeps every prefix token (a sliding-window layer's own cache would drop some).
        prefix_cache = model(input_ids=prefix, cache=DynamicCache(), use_cache=True).cache
        prefix_layers = [(layer.keys, layer.values) for layer in prefix_cache.layers]
    packed = torch.tensor(layout.tokens, dtype=torch.long, device=device)
    depth = torch.tensor(layout.depth, dtype=torch.long, device=device)
    rows_index = torch.tensor(layout.rows, device=device)
    target = torch.tensor(layout.target, device=device)
    owner = torch.tensor(layout.owner, device=device)
    mine: list[tuple[int, list[float]]] = []
    batches = padding_bounded_batches([len(p) - shared for p in prompts], batch_size)
    with state.split_between_processes(batches) as local:
        for batch_ids in tqdm(local, desc=desc, leave=False, disable=not state.is_local_main_process):
            rows = len(batch_ids)
            batch = pad_batch(
                [{"input_ids": prompts[i][shared:]} for i in batch_ids], pad_id, "left", ("input_ids",)
            )
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            lengths = shared + mask.sum(-1)  # each row's real prompt length
            positions = torch.cat(
                [shared + (mask.cumsum(-1) - 1).clamp(min=0), lengths[:, None] + depth[None, :]], dim=1
            )
            cache = None
            if prefix_layers is not None:
                cache = DynamicCache()
                for number, (keys, values) in enumerate(prefix_layers):
                    cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), number)
            allowed = packed_attention_mask(mask, shared, layout)
            out = model(
                input_ids=torch.cat([ids, packed.expand(rows, -1)], dim=1),
                attention_mask=model_masks(model, allowed, positions, shared),
                position_ids=positions,
                cache=cache,
                use_cache=cache is not None,
                logits_to_keep=len(layout.tokens) + 1,
            )
            logp = torch.log_softmax(out.logits.float(), dim=-1)  # [rows, 1 + packed, vocab]
            scored = logp[:, rows_index, target]  # [rows, scored tokens]
            totals = torch.zeros(rows, len(choices), device=device).index_add_(1, owner, scored)
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
