"""`PerTaskModel`: the adapter-wrapped backbone, the per-task heads and the router as one module.

Its forward computes everything a training step of the heads needs: the task's features, its head
logits (word level, task t > 0: with task 0's "O" logit in front) and the router weights. The
Trainer hands the loss a data-parallel wrapper of this module (DDP, FSDP); only what runs inside
the wrapper's forward has its gradients synchronised across processes, so the loss calls
`model(...)` and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers.utils import ModelOutput

from retain.cl.pertask.adapters import adapter_name, adapters_off, task_adapter
from retain.cl.pertask.heads import drop_virtual, pool
from retain.cl.pertask.router import TaskRouter


def resolve_pooling(setting: str, has_cls_token: bool) -> str:
    """`auto`: the CLS token for BERT-style encoders, else the last real token (decoders)."""
    if setting != "auto":
        return setting
    return "cls" if has_cls_token else "last"


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass
class HeadOutput(ModelOutput):
    #: task t's TIL logits: [B, classes] (sentence level) or [B, L, classes] (word level)
    logits: torch.Tensor | None = None
    #: the router's weight per task [B, T] (only when asked for)
    router_weights: torch.Tensor | None = None


class PerTaskModel(nn.Module):
    """The Trainer optimises every parameter that requires grad, so heads and router must live in
    the module it trains; checkpoints hold them too."""

    loss_type = None  # the Trainer must not shift labels when it counts them

    def __init__(self, backbone: PeftModel, pooling: str, word_level: bool, num_virtual: int):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        self.router: TaskRouter | None = None
        self.pooling = pooling
        self.word_level = word_level
        #: soft-prompt positions in front of the hidden states of the active adapter (0 for LoRA)
        self.num_virtual = num_virtual

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_index: int,
        route: bool = False,
        labels: torch.Tensor | None = None,
    ) -> HeadOutput:
        """Task `task_index`'s TIL logits and, with `route`, the router's weights (labels are unused)."""
        weights = self.router(self.router_features(input_ids, attention_mask)) if route else None
        return HeadOutput(
            logits=self.til_logits(task_index, input_ids, attention_mask), router_weights=weights
        )

    # ---- features and logits ---------------------------------------------------------------------
    def hidden(self, ids, mask, index: int | None) -> tuple[torch.Tensor, int]:
        """Last hidden states with task `index`'s adapter, or with no adapter at all (None), and the
        number of soft-prompt positions in front of them."""
        if index is None:
            with adapters_off(self.backbone) as bare:
                return bare(input_ids=ids, attention_mask=mask).last_hidden_state, 0
        with task_adapter(self.backbone, adapter_name(index)):
            return self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state, self.num_virtual

    def features(self, hidden, mask, num_virtual: int) -> torch.Tensor:
        """What a head reads: every real token (word level) or the pooled sentence."""
        if self.word_level:
            return drop_virtual(hidden, mask, num_virtual)
        return pool(hidden, mask, self.pooling, num_virtual)

    def head_logits(self, index: int, ids, mask) -> torch.Tensor:
        hidden, virtual = self.hidden(ids, mask, index)
        return self.heads[adapter_name(index)](self.features(hidden, mask, virtual))

    @torch.no_grad()
    def o_logits(self, ids, mask) -> torch.Tensor:
        """The "O" logit of word-level tasks after the first: task 0's adapter and head, no grad, no dropout."""
        with eval_mode(self.backbone):
            return self.head_logits(0, ids, mask)[..., :1]

    @torch.no_grad()
    def router_features(self, ids, mask) -> torch.Tensor:
        """Pooled features of the backbone with every adapter disabled: the same for every task."""
        with eval_mode(self.backbone):
            hidden, _ = self.hidden(ids, mask, None)
        return pool(hidden, mask, self.pooling, 0)

    def til_logits(self, index: int, ids, mask) -> torch.Tensor:
        logits = self.head_logits(index, ids, mask)
        if self.word_level and index > 0:
            logits = torch.cat([self.o_logits(ids, mask), logits], dim=-1)
        return logits

    # ---- gradient checkpointing (the Trainer calls these for `gradient_checkpointing: true`) ------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **options) -> None:
        """Checkpoint the backbone's layers. Non-reentrant by default: it needs no input that requires
        grad (the embeddings are frozen) and replays dropout masks exactly."""
        base = self.backbone.get_base_model()
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is None:  # transformers before the rename
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
        else:
            enable(activation_checkpointing_kwargs=kwargs, **options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **options) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)
