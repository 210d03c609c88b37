"""I-LoRA's config keys: the seed's names and defaults, plus documented additions (README.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from retain.errors import ConfigError
from retain.hparams.option import option

PLASTIC = "default"
STABLE = "ema"
EVAL_ADAPTERS = (STABLE, PLASTIC)


@dataclass
class ILORAArguments:
    """Arguments of the I-LoRA method (the seed's names and defaults, plus two documented additions)."""

    use_ilora: bool = option(False, "Whether to use the I-LoRA method (same as `cl_method: ilora`).")
    ema_alpha: float = option(
        0.25,
        "EMA coefficient in [0, 1]: the weight on the old EMA value, "
        "ema <- a*ema + (1-a)*default with a = min(1 - 1/(t+1), ema_alpha).",
    )
    consistency_weight: float = option(1.0, "Weight (>= 0) of the hidden-state consistency loss.")
    save_ema_adapter: bool = option(
        True,
        "Save the EMA adapter in each task directory (`ema/`). Needed to continue or evaluate from disk.",
    )
    ema_adapter_path: str | None = option(
        None,
        "Read the previous task's EMA adapter from this directory instead of "
        "`previous_task_model/ema` (requires previous_task_model).",
    )
    selective_update: bool = option(
        True,
        "Selective consistency target: keep the plastic hidden state where it exceeds the stable "
        "one (reg = where(selected, plastic, stable)); false: reg = stable everywhere.",
    )
    min_update_threshold: float = option(
        0.1,
        "Relative margin (>= 0) for the selective target: an element counts as selected when "
        "plastic > stable + threshold * |stable|. 0 gives the seed's plastic > stable.",
    )
    hidden_state_layers: list[int] | str = field(
        default_factory=lambda: [-1, -2, -3],
        metadata={
            "help": "Hidden states compared by the consistency loss, as indices into the model's "
            "hidden_states (0: embeddings, -1: the final normed output), or 'all' (every decoder layer)."
        },
    )
    ilora_buffer_size: int = option(
        500, "Capacity (>= 0) of the reservoir replay buffer of training samples."
    )
    ilora_eval_adapter: str = option(
        STABLE, "Adapter that answers at evaluation: 'ema' (the stable one) or 'default'."
    )
    ilora_replay_batch_size: int | None = option(
        None, "Buffer rows replayed with each micro-batch. None: per_device_train_batch_size."
    )

    ilora_pass: str = option(
        "split",
        "How a step's current and replayed rows are trained: 'split' (the current rows' backward "
        "first, then the replayed rows' with the consistency loss: the activations of one half at a time) "
        "or 'joined' (one pass over both). The gradients are the same. docs: the I-LoRA README.",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ConfigError("must be in [0, 1]", field="ema_alpha")
        if self.consistency_weight < 0:
            raise ConfigError("must be >= 0", field="consistency_weight")
        if self.min_update_threshold < 0:
            raise ConfigError("must be >= 0", field="min_update_threshold")
        if self.ilora_buffer_size < 0:
            raise ConfigError("must be >= 0", field="ilora_buffer_size")
        if self.ilora_replay_batch_size is not None and self.ilora_replay_batch_size < 1:
            raise ConfigError("must be a positive integer or null", field="ilora_replay_batch_size")
        if self.ilora_pass not in ("split", "joined"):
            raise ConfigError(f"expected 'split' or 'joined', got {self.ilora_pass!r}", field="ilora_pass")
        if self.ilora_eval_adapter not in EVAL_ADAPTERS:
            raise ConfigError("expected 'ema' or 'default'", field="ilora_eval_adapter")
        self.hidden_state_layers = _parse_layers(self.hidden_state_layers)


def _parse_layers(value: list[int] | str) -> list[int] | str:
    if isinstance(value, str):
        text = value.strip()
        if text == "all":
            return "all"
        try:
            value = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(
                f"expected 'all' or a list of layer indices, got {text!r}", field="hidden_state_layers"
            ) from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError("expected 'all' or a non-empty list of layer indices", field="hidden_state_layers")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in value):
        raise ConfigError("layer indices must be integers", field="hidden_state_layers")
    return list(value)
