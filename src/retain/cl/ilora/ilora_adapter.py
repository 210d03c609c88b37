"""I-LoRA's adapter pair on top of the shared LoRA helpers (`retain.model.adapters`).

The model carries two LoRA adapters with the same config:
- `default`: the plastic adapter, the only one that requires grad and sits in the optimizer;
- `ema`: the stable adapter, an exponential moving average of `default`; it never requires grad.

Switching which adapter answers a forward pass goes through `use_adapter`, which changes only the
active-adapter markers. peft's own `set_adapter` also sets `requires_grad=True` on the adapter it
activates, which would put `ema` into the autograd graph in the middle of a training step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from retain.cl.ilora.config import PLASTIC, STABLE
from retain.errors import ModelError
from retain.hparams.args import FinetuningArguments
from retain.model.adapters import (
    ADAPTER_WEIGHTS,
    adapter_parameters,
    add_lora,
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


def paired_parameters(
    model: torch.nn.Module, source: str, target: str
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The tensors of two adapters, paired by module and weight name (same order in both lists)."""
    src = adapter_parameters(model, source)
    dst = adapter_parameters(model, target)
    if src.keys() != dst.keys():
        raise ModelError(f"adapters {source!r} and {target!r} do not cover the same modules")
    keys = sorted(src)
    for key in keys:
        if src[key].shape != dst[key].shape:
            raise ModelError(f"adapters {source!r} and {target!r} differ in shape at {key}")
    return [src[k] for k in keys], [dst[k] for k in keys]


@torch.no_grad()
def copy_adapter_weights(model: torch.nn.Module, source: str, target: str) -> None:
    """`target <- source`, tensor by tensor (requires_grad flags are left as they are)."""
    src, dst = paired_parameters(model, source, target)
    torch._foreach_copy_(dst, src)


# ---- which adapter answers ------------------------------------------------------------------------


def _tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def activate_adapter(
    model: PeftModel, name: str, layers: list[BaseTunerLayer] | None = None
) -> tuple[object, object, list[object]]:
    """Make adapter `name` the active one without touching any `requires_grad` flag.

    Returns the previous markers, for `restore_active_adapter`. `layers` (the model's tuner layers)
    can be passed to skip the module walk.
    """
    if name not in model.peft_config:
        raise ModelError(f"no adapter named '{name}' in the model")
    layers = _tuner_layers(model) if layers is None else layers
    previous = (model.active_adapter, model.base_model.active_adapter, [m._active_adapter for m in layers])
    model.active_adapter = name  # PeftModel's marker (peft config lookups)
    model.base_model.active_adapter = name  # the tuner's marker
    for module in layers:
        module._active_adapter = [name]  # what the LoRA layers' forward reads
    return previous


def restore_active_adapter(
    model: PeftModel,
    previous: tuple[object, object, list[object]],
    layers: list[BaseTunerLayer] | None = None,
) -> None:
    layers = _tuner_layers(model) if layers is None else layers
    peft_marker, tuner_marker, layer_markers = previous
    model.active_adapter = peft_marker
    model.base_model.active_adapter = tuner_marker
    for module, marker in zip(layers, layer_markers, strict=True):
        module._active_adapter = marker


@contextlib.contextmanager
def use_adapter(model: PeftModel, name: str, layers: list[BaseTunerLayer] | None = None) -> Iterator[None]:
    """Run the block with adapter `name` active; restore the previous adapter after. No grad flag changes."""
    layers = _tuner_layers(model) if layers is None else layers
    previous = activate_adapter(model, name, layers)
    try:
        yield
    finally:
        restore_active_adapter(model, previous, layers)


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
