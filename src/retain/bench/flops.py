"""Matmul FLOPs of a LoRA training step on a decoder (Llama-style), for the floors of `step-time`.

Counted: the linear layers of every decoder layer (q, k, v, o, gate, up, down), the two attention
matmuls (QK^T and AV, over the padded width), and the LM head at the positions whose logits the
loss keeps (`logits_to_keep`). Not counted: LoRA's own low-rank matmuls (rank/hidden of the
linear FLOPs: about 1% at rank 8 on SmolLM2), norms, activations, softmax, the optimizer.

Backward: the base weights are frozen, so a frozen linear layer computes only the gradient of its
input (`dX = dY W`): as many FLOPs as its forward, not twice as many (there is no `dW`). The two
attention matmuls have activations on both sides, so their backward costs twice their forward.
The textbook rule (backward = 2 x forward, full fine-tuning) is given beside it for reference.

    seq step           = fwd(B rows) + bwd(B rows)
    I-LoRA step        = fwd(2B rows) + bwd(2B rows) + body_fwd(B buffer rows, no LM head)
    ratio (frozen)     ~ (2 * 2 + 1) / 2 = 2.5    when every row has the same length
    ratio (textbook)   ~ (2 * 3 + 1) / 3 = 2.33
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from retain.cl.loss import shifted_targets


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    layers: int
    q_dim: int
    kv_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape | None:
        """The shape of a Llama-style decoder config; None for other architectures."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            return cls(
                hidden=config.hidden_size,
                intermediate=config.intermediate_size,
                layers=config.num_hidden_layers,
                q_dim=heads * head_dim,
                kv_dim=kv_heads * head_dim,
                vocab=config.vocab_size,
            )
        except (AttributeError, TypeError):
            return None

    @property
    def linear_params(self) -> int:
        """Weights of the linear layers of one decoder layer."""
        d = self.hidden
        return d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d + 3 * d * self.intermediate


def forward_flops(shape: DecoderShape, rows: int, width: int, kept: int, head: bool = True) -> float:
    """A forward pass over a padded [rows, width] batch; the LM head at `kept` positions per row."""
    tokens = rows * width
    body = shape.layers * tokens * (2 * shape.linear_params + 4 * width * shape.q_dim)
    return float(body + (2 * shape.hidden * shape.vocab * rows * kept if head else 0))


def backward_flops(shape: DecoderShape, rows: int, width: int, kept: int, frozen: bool = True) -> float:
    """Backward of `forward_flops`; `frozen`: base weights frozen (input gradients only)."""
    if not frozen:
        return 2 * forward_flops(shape, rows, width, kept)
    tokens = rows * width
    body = shape.layers * tokens * (2 * shape.linear_params + 8 * width * shape.q_dim)
    return float(body + 2 * shape.hidden * shape.vocab * rows * kept)


def batch_dims(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(rows, padded width, positions whose logits the loss keeps) of a right-padded training batch."""
    rows, width = batch["input_ids"].shape
    keep, _ = shifted_targets(batch["labels"])
    return int(rows), int(width), int(keep.numel())


def train_step_flops(shape: DecoderShape, batch: dict[str, torch.Tensor], frozen: bool = True) -> float:
    rows, width, kept = batch_dims(batch)
    return forward_flops(shape, rows, width, kept) + backward_flops(shape, rows, width, kept, frozen)


def body_forward_flops(shape: DecoderShape, batch: dict[str, torch.Tensor]) -> float:
    """A no-grad pass through the transformer body only (no LM head), e.g. I-LoRA's EMA pass."""
    rows, width = batch["input_ids"].shape
    return forward_flops(shape, int(rows), int(width), 0, head=False)


def lora_forward_flops(shape: DecoderShape, tokens: int, rank: int) -> float:
    """One LoRA adapter's forward on every linear layer of the body: x A^T then (x A^T) B^T per token."""
    d = shape.hidden
    per_layer = (d + shape.q_dim) + 2 * (d + shape.kv_dim) + (shape.q_dim + d) + 3 * (d + shape.intermediate)
    return float(2 * rank * per_layer * shape.layers * tokens)
