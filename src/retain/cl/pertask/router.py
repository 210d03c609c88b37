"""NewLoRA's task router: an MLP from sentence features to one weight in (0, 1) per task.

Its input is the pooled output of the backbone with every adapter disabled (no LoRA, no soft
prompt), so the router sees the same features whichever adapter is active, in training and at
inference. It is trained on every task with the preference loss: the mean squared error between
its output and the one-hot vector of the current task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskRouter(nn.Module):
    """hidden -> hidden/2 -> num_task, ReLU between, Sigmoid at the end (the seed's `mlp`)."""

    def __init__(self, hidden_size: int, num_task: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_task = num_task
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size // 2),
            nn.ReLU(),
            nn.Linear(hidden_size // 2, num_task),
            nn.Sigmoid(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)

    def load_grown(self, state: dict[str, torch.Tensor]) -> None:
        """Load a router saved with at most `num_task` outputs; outputs it lacks keep their fresh values.

        A run continued one task per command knows only the tasks so far, so its router grows.
        """
        own = self.state_dict()
        if set(state) != set(own):
            raise ValueError(f"router keys differ: {sorted(state)} vs {sorted(own)}")
        merged = {}
        for key, value in state.items():
            target = own[key]
            if (
                key.startswith("mlp.2.")
                and value.shape[0] <= target.shape[0]
                and value.shape[1:] == target.shape[1:]
            ):
                grown = target.clone()
                grown[: value.shape[0]] = value
                merged[key] = grown
            elif value.shape == target.shape:
                merged[key] = value
            else:
                raise ValueError(
                    f"router tensor {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                )
        self.load_state_dict(merged, strict=True)


def preference_sum(weights: torch.Tensor, task: int) -> torch.Tensor:
    """Sum over rows of the per-row MSE between the router weights [B, T] and one-hot(task).

    Divided by B this is the seed's `F.mse_loss(weights, one_hot)`.
    """
    target = torch.zeros_like(weights)
    target[:, task] = 1.0
    return F.mse_loss(weights.float(), target.float(), reduction="none").mean(dim=-1).sum()


def route(weights: torch.Tensor, seen: int) -> torch.Tensor:
    """Hard routing: the index of the highest weight among the first `seen` tasks, per row."""
    return weights[:, :seen].argmax(dim=-1)


def soft_scores(head_logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Soft task selection: each seen task j's head log-softmax plus the log of the row's router weight
    for j, concatenated over the heads (global label order); the prediction is their argmax.

    `head_logits[j]` is [B, C_j]; `weights` [B, T] holds each row's own router outputs (T >= the heads).
    One-hot weights give hard routing's answer; equal weights give `all` over log-softmax-normalised heads.
    """
    parts = [
        F.log_softmax(logits.float(), dim=-1) + torch.log(weights[:, j : j + 1].float())
        for j, logits in enumerate(head_logits)
    ]
    return torch.cat(parts, dim=-1)
