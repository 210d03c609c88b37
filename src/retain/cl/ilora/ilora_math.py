"""I-LoRA's math as pure functions, checked in tests against hand-computed values.

`ema_decay` and `ema_update_` (the stable adapter's EMA), `selective_mask` and
`consistency_loss` (the selective hidden-state consistency), `resolve_hidden_layers` (which
layers it reads), `concat_right_padded` (the joined current + replay batch). README.md gives the
formulas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from retain.data.prompt import IGNORE_INDEX
from retain.errors import ConfigError


def resolve_hidden_layers(spec: list[int] | str, num_layers: int) -> list[int]:
    """Indices into `hidden_states` (length num_layers + 1), non-negative and sorted.

    `hidden_states[0]` is the embedding output, `hidden_states[i]` the output of decoder layer i, and
    the last one (index num_layers, or -1) is the final normed output. 'all' means 1..num_layers.
    """
    if spec == "all":
        return list(range(1, num_layers + 1))
    count = num_layers + 1
    resolved = []
    for index in spec:
        if not -count <= index < count:
            raise ConfigError(
                f"layer index {index} is out of range for a model with {num_layers} layers "
                f"(valid: {-count}..{count - 1})",
                field="hidden_state_layers",
            )
        resolved.append(index % count)
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"{list(spec)} names a layer twice", field="hidden_state_layers")
    return sorted(resolved)


def ema_decay(step: int, alpha: float) -> float:
    """`a_t = min(1 - 1/(t+1), alpha)`; `t` is the 0-based index of the update within the task."""
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update_(ema: Sequence[torch.Tensor], online: Sequence[torch.Tensor], decay: float) -> None:
    """In place, fused over all tensors: `ema <- decay * ema + (1 - decay) * online`."""
    ema, online = list(ema), list(online)
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, online, alpha=1.0 - decay)


def selective_mask(plastic: torch.Tensor, stable: torch.Tensor, threshold: float) -> torch.Tensor:
    """Where the plastic state is kept as its own target: `plastic > stable + threshold * |stable|`.

    With threshold 0 this is exactly the seed's `plastic > stable`.
    """
    if threshold == 0:
        return plastic > stable
    return plastic > stable + threshold * stable.abs()


def consistency_loss(
    plastic: Sequence[torch.Tensor],
    stable: Sequence[torch.Tensor],
    mask: torch.Tensor,
    *,
    selective: bool = True,
    threshold: float = 0.0,
    num_tokens: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean over the layers, the real tokens and the hidden units of `(plastic - reg)^2`.

    `reg = where(selective_mask, plastic, stable)` (or `stable` everywhere when `selective` is off);
    the stable states carry no gradient. `mask` [B, T] marks the real (non-padding) tokens. The
    token count of the mean is `mask.sum()` unless `num_tokens` is given (the trainer passes the
    real-token count of the whole optimizer step, so that micro-batches add up to one mean).
    """
    if len(plastic) != len(stable) or not plastic:
        raise ValueError("need the same, non-zero number of plastic and stable hidden states")
    weights = mask.to(torch.float32)
    total = plastic[0].new_zeros((), dtype=torch.float32)
    for p, s in zip(plastic, stable, strict=True):
        p32, s32 = p.float(), s.detach().float()
        diff = p32 - s32
        if selective:
            # reg = plastic where selected: (plastic - reg) is 0 there, and (plastic - stable) elsewhere.
            diff = diff.masked_fill(selective_mask(p32, s32, threshold), 0.0)
        total = total + (diff.square().sum(dim=-1) * weights).sum()
    if num_tokens is None:
        num_tokens = weights.sum().clamp(min=1.0)
    return total / (len(plastic) * plastic[0].size(-1) * num_tokens)


def concat_right_padded(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], pad_id: int
) -> dict[str, torch.Tensor]:
    """Stack two right-padded batches (input_ids, labels, attention_mask) into one, padding the narrower."""
    width = max(first["input_ids"].size(1), second["input_ids"].size(1))
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    parts = []
    for batch in (first, second):
        gap = width - batch["input_ids"].size(1)
        parts.append({k: F.pad(batch[k], (0, gap), value=v) if gap else batch[k] for k, v in fills.items()})
    return {k: torch.cat([parts[0][k], parts[1][k]]) for k in fills}
