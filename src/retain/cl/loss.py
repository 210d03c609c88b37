"""Loss normalisation under gradient accumulation and data parallelism, and the causal-LM loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retain.data.prompt import IGNORE_INDEX


@dataclass
class LossScale:
    """How one micro-batch's loss terms become a correctly normalised training loss.

    `num_items` is the number of label tokens in the whole optimizer step: every micro-batch of
    the accumulation window, summed over all processes (the Trainer gathers it). A token-level
    mean is `sum * num_processes / num_items`: DDP averages gradients over processes, so the
    factor makes the result the exact mean over all tokens of the step. A per-batch mean term
    (a consistency loss, a head's cross-entropy) is divided by the number of accumulated
    micro-batches; DDP's average over processes then gives the mean over all micro-batches.
    """

    num_items: torch.Tensor | int | None
    accumulation_steps: int = 1
    num_processes: int = 1

    def token_mean(self, total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
        if self.num_items is None:
            return total / max(int(count), 1) if isinstance(count, int) else total / count.clamp(min=1)
        return total * self.num_processes / self.num_items

    def batch_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value / self.accumulation_steps


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next token is a label, and those next tokens: (keep [P], targets [B, P])."""
    next_labels = labels[:, 1:]
    keep = (next_labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    return keep, next_labels[:, keep]


def token_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies over non-ignored targets, and their count."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (targets != IGNORE_INDEX).sum()


def causal_lm_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], scale: LossScale) -> torch.Tensor:
    """Answer-token cross-entropy; the LM head runs only at positions that predict a label."""
    total, count = causal_lm_sums(model, inputs)
    return scale.token_mean(total, count)


def logged_causal_lm_loss(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], scale: LossScale, terms: LossTerms
) -> torch.Tensor:
    """`causal_lm_loss`, also logged as `loss_ce` in training (for methods whose loss is the CE alone)."""
    loss = causal_lm_loss(model, inputs, scale)
    if model.training:
        terms.add(loss_ce=loss)
    return loss


def causal_lm_sums(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = inputs["labels"]
    keep, targets = shifted_targets(labels)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep)
    return token_ce_sum(out.logits, targets)


class LossTerms:
    """The named terms of a method's training loss, as they enter it, kept for the Trainer's log.

    A method calls `add(name=value, ...)` in `compute_loss` with each micro-batch's (already
    normalised) terms; the trainer counts optimizer steps (`new_step`) and, at each log, writes the
    per-step mean of every term since the last log next to `loss` (averaged over processes like
    `loss`), so the logged terms add up to it. Terms reach the log history, TensorBoard and W&B.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, **terms: torch.Tensor) -> None:
        for name, value in terms.items():
            value = value.detach().float().reshape(())
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def new_step(self) -> None:
        self.steps += 1

    def pop(self) -> tuple[dict[str, torch.Tensor], int]:
        """The sums and the number of steps since the last pop; starts over."""
        sums, steps = self.sums, self.steps
        self.sums, self.steps = {}, 0
        return sums, steps
