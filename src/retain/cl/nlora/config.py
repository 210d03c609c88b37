"""N-LoRA's config keys (the published code's default weight; docs/methods/nlora.md)."""

from __future__ import annotations

from dataclasses import dataclass

from retain.cl.stacked.config import check_weight
from retain.hparams.option import option


@dataclass
class NLoRAArguments:
    nlora_lambda: float = option(
        0.4,
        "Weight (>= 0) of the sparsity term: the sum over target modules of ||B_t A_t||_1, the "
        "entrywise L1 norm of the current task's update. 0 is IncLoRA.",
    )
    l2_lambda: float = option(
        0.0,
        "Weight (>= 0) of the current LoRA's squared Frobenius norm, summed over target modules "
        "(N-LoRA has no such term: default 0).",
    )

    def __post_init__(self) -> None:
        check_weight(self.nlora_lambda, "nlora_lambda")
        check_weight(self.l2_lambda, "l2_lambda")
