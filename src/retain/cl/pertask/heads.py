"""Classification heads and the features they read from the backbone's hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """`s * cos(x, w_c)` for every class c, with a learnable scale `s`.

    Inputs and class weights are L2-normalised over the feature dimension (the last one), so a
    2-D input [B, H] and a 3-D input [B, L, H] give the same logits for the same feature vector:
    each token is normalised on its own, never across tokens.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def make_head(kind: str, in_features: int, out_features: int, cosine_scale: float = 16.0) -> nn.Module:
    if kind == "Linear":
        return nn.Linear(in_features, out_features)
    if kind == "CosineLinear":
        return CosineLinear(in_features, out_features, cosine_scale)
    raise ValueError(f"unknown classifier '{kind}'")


def first_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the first attended token of each row (any padding side)."""
    return mask.long().argmax(dim=-1)


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last attended token of each row (any padding side)."""
    length = mask.size(-1)
    return length - 1 - mask.long().flip(-1).argmax(dim=-1)


def drop_virtual(hidden: torch.Tensor, mask: torch.Tensor, num_virtual: int) -> torch.Tensor:
    """The hidden states of the real tokens: prompt tuning prepends `num_virtual` positions."""
    if hidden.size(1) != mask.size(1) + num_virtual:
        raise ValueError(
            f"hidden states cover {hidden.size(1)} positions, expected {mask.size(1)} tokens + {num_virtual} virtual"
        )
    return hidden[:, num_virtual:]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, num_virtual: int = 0) -> torch.Tensor:
    """Sentence features [B, H] from hidden states [B, V + L, H] and the real tokens' mask [B, L].

    `cls` takes the first real token, `last` the last real token, `mean` the mean over real tokens;
    the `num_virtual` soft-prompt positions at the front are skipped.
    """
    real = drop_virtual(hidden, mask, num_virtual)
    if pooling == "mean":
        weights = mask.to(real.dtype).unsqueeze(-1)
        return (real * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if pooling == "cls":
        index = first_real_index(mask)
    elif pooling == "last":
        index = last_real_index(mask)
    else:
        raise ValueError(f"unknown pooling '{pooling}'")
    return real[torch.arange(real.size(0), device=real.device), index]
