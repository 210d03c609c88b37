"""N-LoRA's config keys (the published code's default weight; docs/methods/nlora.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from retain.cl.stacked.config import check_weight


@dataclass
class NLoRAArguments:
    use_nlora: bool = field(
        default=False, metadata={"help": "Whether to use N-LoRA (same as `cl_method: nlora`)."}
    )
    nlora_lambda: float = field(
        default=0.4,
        metadata={
            "help": "Weight (>= 0) of the sparsity term: the sum over target modules of ||B_t A_t||_1, the "
            "entrywise L1 norm of the current task's update. 0 is IncLoRA."
        },
    )
    l2_lambda: float = field(
        default=0.0,
        metadata={
            "help": "Weight (>= 0) of the current LoRA's squared Frobenius norm, summed over target modules "
            "(N-LoRA has no such term: default 0)."
        },
    )

    def __post_init__(self) -> None:
        check_weight(self.nlora_lambda, "nlora_lambda")
        check_weight(self.l2_lambda, "l2_lambda")
