"""I-LoRA's adapter pair on top of the shared LoRA helpers (`retain.model.adapters`).

The model carries two LoRA adapters with the same config:
- `default`: the plastic adapter, the only one that requires grad and sits in the optimizer;
- `ema`: the stable adapter, an exponential moving average of `default`; it never requires grad.

Switching which adapter answers a forward pass goes through `use_adapter`, which changes only the
active-adapter markers. peft's own `set_adapter` also sets `requires_grad=True` on the adapter it
activates, which would put `ema` into the autograd graph in the middle of a training step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from retain.cl.ilora.config import PLASTIC, STABLE
from retain.errors import ModelError
from retain.hparams.args import FinetuningArguments
from retain.model.adapters import (
    ADAPTER_WEIGHTS,
    activate_adapter,
    add_lora,
    copy_adapter_weights,
    load_adapter_weights,
    lora_config,
    save_adapter,
    set_trainable,
)

ADAPTERS = (PLASTIC, STABLE)


def init_ilora_adapter(model: torch.nn.Module, finetuning_args: FinetuningArguments) -> PeftModel:
    """Wrap a base model with I-LoRA's `default` (trainable) and `ema` (frozen copy) LoRA adapters."""
    return _setup_ilora_tuning(model, lora_config(finetuning_args))


def _setup_ilora_tuning(model: torch.nn.Module, config: LoraConfig) -> PeftModel:
    """Add both adapters with one config, start `ema` as an exact copy of `default`, freeze `ema`."""
    if isinstance(model, PeftModel) and any(name in model.peft_config for name in ADAPTERS):
        raise ModelError(f"the model already has an adapter named {PLASTIC!r} or {STABLE!r}")
    peft_model = add_lora(model, PLASTIC, config)
    add_lora(peft_model, STABLE, config)
    copy_adapter_weights(peft_model, PLASTIC, STABLE)
    set_trainable(peft_model, {PLASTIC})
    activate_adapter(peft_model, PLASTIC)
    return peft_model


# ---- saving and loading ----------------------------------------------------------------------------


def save_ilora_adapters(model: PeftModel, directory: str | Path, save_ema: bool = True) -> None:
    """`directory/default/` and (with `save_ema`) `directory/ema/`, each in the standard PEFT layout."""
    directory = Path(directory)
    save_adapter(model, PLASTIC, directory / PLASTIC)
    if save_ema:
        save_adapter(model, STABLE, directory / STABLE)


def load_ilora_adapters(model: PeftModel, directory: str | Path, ema_path: str | Path | None = None) -> None:
    """Load `directory/default` into `default` and `directory/ema` (or `ema_path`) into `ema`."""
    directory = Path(directory)
    stable = Path(ema_path) if ema_path else directory / STABLE
    for path in (directory / PLASTIC, stable):
        if not (path / ADAPTER_WEIGHTS).is_file():
            hint = (
                " (was it saved with save_ema_adapter: false? set ema_adapter_path)"
                if path == directory / STABLE
                else " (not an I-LoRA task directory)"
            )
            raise ModelError(f"I-LoRA adapter not found{hint}", source=str(path))
    load_adapter_weights(model, PLASTIC, directory / PLASTIC)
    load_adapter_weights(model, STABLE, stable)


def hand_over(model: PeftModel) -> None:
    """Start a new task: `default <- ema` (the previous task's stable adapter), both equal after."""
    copy_adapter_weights(model, STABLE, PLASTIC)
    set_trainable(model, {PLASTIC})
