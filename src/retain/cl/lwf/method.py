"""LwF on the model's own token distribution: `seq` plus distillation from the previous task's adapter.

The model carries two LoRA adapters with one config: `default`, the one that trains (as in `seq`),
and `teacher`, a frozen copy of `default` as it was after the previous task (copied in
`begin_task`; it never requires grad). From the second task on, the loss of a micro-batch is

    (1 - lwf_alpha) * CE + lwf_alpha * T^2 * KL(softmax(z_old / T) || softmax(z_new / T))

over the answer tokens of the current task's rows, both terms token means of the optimizer step
(`LossScale.token_mean`). The teacher pass runs under `torch.no_grad`, in eval mode (no dropout),
with `teacher` active. The formulas and the choices are in docs/methods/lwf.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from retain.cl.base import Task
from retain.cl.loss import LossScale, causal_lm_loss, shifted_targets, token_ce_sum
from retain.cl.lwf import SPEC
from retain.cl.lwf.config import LwFArguments
from retain.cl.seq.method import Seq
from retain.data.prompt import IGNORE_INDEX
from retain.model.adapters import (
    activate_adapter,
    add_lora,
    copy_adapter_weights,
    lora_config,
    set_trainable,
    tuner_layers,
    use_adapter,
)

TEACHER = "teacher"

# ---- pure math -----------------------------------------------------------------------------------------


def distillation_kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`sum over answer positions of KL(softmax(teacher / T) || softmax(student / T))`, in float32.

    `student_logits` and `teacher_logits` are [B, P, V] at the positions that predict `targets`
    [B, P]; positions whose target is IGNORE_INDEX do not count.
    """
    keep = targets != IGNORE_INDEX
    student = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="sum", log_target=True)


def lwf_terms(
    ce: torch.Tensor, kl: torch.Tensor, alpha: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the loss, `(1 - alpha) * ce` and `alpha * T^2 * kl`; the loss is their sum.

    T^2 keeps the soft term's gradient on the same scale whatever T (Hinton et al., 2015).
    """
    return (1.0 - alpha) * ce, alpha * temperature**2 * kl


# ---- logging -------------------------------------------------------------------------------------------


# ---- the method ----------------------------------------------------------------------------------------


class LwF(Seq):
    """`default` learns; `teacher` holds the previous task's `default` and answers only the KL term."""

    spec = SPEC
    sharding_limit = "its teacher is a copy of the trained adapter's whole weights"

    def __init__(self, config):
        super().__init__(config)
        self.args: LwFArguments
        self.model = None
        self.has_teacher = False  # whether the current task distils (from the second task on)

    def prepare_model(self, model, tokenizer):
        peft_model = super().prepare_model(model, tokenizer)
        # The teacher's random initialisation is overwritten by the copy; it must not move the
        # global random state (the model is still on the CPU here).
        with torch.random.fork_rng(devices=[]):
            add_lora(peft_model, TEACHER, lora_config(self.config.finetuning))
        copy_adapter_weights(peft_model, self.adapter_name, TEACHER)
        self.bind(peft_model)
        return peft_model

    def bind(self, peft_model) -> None:
        self.model = peft_model
        self._layers = tuner_layers(peft_model)
        self._modules = list(peft_model.modules())
        self._train_default_only()

    def _train_default_only(self) -> None:
        set_trainable(self.model, {self.adapter_name})
        activate_adapter(self.model, self.adapter_name, self._layers)

    # ---- task boundaries -------------------------------------------------------------------------
    def begin_task(self, model, task: Task, data) -> None:
        """From the second task on (or after `previous_task_model`), `teacher <- default`."""
        self.has_teacher = task.index > 0 or bool(self.config.cl.previous_task_model)
        if self.has_teacher:
            copy_adapter_weights(self.model, self.adapter_name, TEACHER)
        self._train_default_only()

    def load_task(self, model, task: Task | None, directory: Path) -> None:
        super().load_task(model, task, directory)
        self._train_default_only()

    # ---- the training step -----------------------------------------------------------------------
    def compute_loss(self, model, inputs, scale: LossScale) -> torch.Tensor:
        alpha, temperature = self.args.lwf_alpha, self.args.lwf_temperature
        if not model.training:
            return causal_lm_loss(model, inputs, scale)
        if not self.has_teacher or alpha == 0:  # plain CE, exactly seq's; no teacher pass
            ce = causal_lm_loss(model, inputs, scale)
            self.loss_terms.add(loss_ce=ce, loss_kl=ce.new_zeros(()))
            return ce
        keep, targets = shifted_targets(inputs["labels"])
        out = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep
        )
        ce_sum, count = token_ce_sum(out.logits, targets)
        teacher = self.teacher_logits(inputs, keep)
        kl_sum = distillation_kl_sum(out.logits, teacher, targets, temperature)
        ce_term, kl_term = lwf_terms(
            scale.token_mean(ce_sum, count), scale.token_mean(kl_sum, count), alpha, temperature
        )
        self.loss_terms.add(loss_ce=ce_term, loss_kl=kl_term)
        return ce_term + kl_term

    @torch.no_grad()
    def teacher_logits(self, inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """The teacher adapter's logits at the positions `keep`: no gradient, every module in eval mode."""
        modes = [m.training for m in self._modules]
        for module in self._modules:
            module.training = False
        try:
            with use_adapter(self.model, TEACHER, self._layers):
                out = self.model(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    logits_to_keep=keep,
                    use_cache=False,
                )
        finally:
            for module, mode in zip(self._modules, modes, strict=True):
                module.training = mode
        return out.logits
