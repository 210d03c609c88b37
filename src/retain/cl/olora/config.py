"""O-LoRA's config keys: EasyCL's names and defaults (the paper's are in docs/methods/olora.md)."""

from __future__ import annotations

from dataclasses import dataclass

from retain.cl.stacked.config import check_weight
from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class OLoRAArguments:
    orthogonal_lambda: float = option(
        0.1,
        "Weight (>= 0) of the orthogonality term: the sum over target modules and earlier tasks i "
        "of sum(|A_i A_t^T|). 0 is IncLoRA (stacked LoRAs without this penalty).",
    )
    l2_lambda: float = option(
        0.01,
        "Weight (>= 0) of the current LoRA's squared Frobenius norm, summed over target modules: "
        "sum ||A_t||_F^2 + ||B_t||_F^2.",
    )
    olora_history_path: str | None = option(
        None,
        "A task directory saved by olora or nlora to read the earlier tasks' LoRAs from when "
        "continuing (previous_task_model); default: previous_task_model itself.",
    )

    def __post_init__(self) -> None:
        check_weight(self.orthogonal_lambda, "orthogonal_lambda")
        check_weight(self.l2_lambda, "l2_lambda")
        if self.olora_history_path is not None and not str(self.olora_history_path).strip():
            raise ConfigError("must be a folder, or null", field="olora_history_path")
