"""Named LoRA adapters: create, select parameters by adapter name, save and load one adapter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from retain.errors import ModelError
from retain.hparams.args import FinetuningArguments

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(args: FinetuningArguments, task_type: str | None = "CAUSAL_LM") -> LoraConfig:
    target: str | list[str]
    if args.lora_target.strip() == "all":
        target = "all-linear"
    else:
        target = [part.strip() for part in args.lora_target.split(",") if part.strip()]
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target,
        task_type=task_type,
    )


def add_lora(model: torch.nn.Module, name: str, config: LoraConfig) -> PeftModel:
    """Wrap a base model (first adapter) or add another named adapter to a PeftModel."""
    if isinstance(config.target_modules, list | set):
        layers = linear_layers(model)
        missing = [t for t in config.target_modules if not any(n == t or n.endswith(f".{t}") for n in layers)]
        if missing:
            short = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ModelError(
                f"{', '.join(repr(m) for m in missing)} is not among this model's linear layers: "
                f"{', '.join(short)} ('all' adapts every one of them)",
                field="lora_target",
            )
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        return model
    try:
        return get_peft_model(model, config, adapter_name=name)
    except ValueError as exc:
        raise ModelError(f"cannot add LoRA: {exc}", field="lora_target") from None


def linear_layers(model: torch.nn.Module) -> list[str]:
    """The full names of the linear layers (nn.Linear, GPT-2's Conv1D, bitsandbytes', and layers an adapter
    already wraps) but the output head; an adapter's own layers do not count."""
    kinds = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")
    names, wrapped = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(f"{name}.")
            names.append(name)
        elif type(module).__name__ in kinds and name.rsplit(".", 1)[-1] != "lm_head":
            names.append(name)
    return names


def adapter_parameters(model: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """Every parameter of adapter `name`, found through the tuner layers' per-adapter containers."""
    params: dict[str, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in module.adapter_layer_names:
            container = getattr(module, attr, None)
            if container is None or name not in container:
                continue
            item = container[name]
            if isinstance(item, torch.nn.Parameter):
                params[f"{module_name}.{attr}"] = item
            else:
                for param_name, param in item.named_parameters():
                    params[f"{module_name}.{attr}.{param_name}"] = param
    if not params:
        raise ModelError(f"no adapter named '{name}' in the model")
    return params


def set_trainable(model: torch.nn.Module, trainable: set[str]) -> None:
    """Make exactly the adapters in `trainable` require grad (without touching which one is active)."""
    for name in model.peft_config:
        for param in adapter_parameters(model, name).values():
            param.requires_grad_(name in trainable)


def save_adapter(model: PeftModel, name: str, directory: str | Path) -> None:
    """Write one adapter in the standard PEFT layout (config + safetensors).

    Callers write into a directory that `retain.io.atomic_dir` renames into place.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS))
    model.peft_config[name].save_pretrained(str(directory))


def load_adapter_weights(model: PeftModel, name: str, directory: str | Path) -> None:
    """Load weights saved by `save_adapter` into the existing adapter `name`.

    Strict: the file must hold exactly the adapter's tensors (none missing, none unexpected) with
    the adapter's shapes.
    """
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ModelError("adapter weights not found", source=str(path))
    state = load_file(str(path))
    expected = get_peft_model_state_dict(model, adapter_name=name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ModelError(
            f"adapter does not match the model's '{name}' adapter ({len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors, e.g. {first})",
            source=str(path),
        )
    wrong = next((k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)), None)
    if wrong is not None:
        raise ModelError(
            f"tensor {wrong} has shape {tuple(state[wrong].shape)}, the model's adapter "
            f"{tuple(expected[wrong].shape)}",
            source=str(path),
        )
    set_peft_model_state_dict(model, state, adapter_name=name)


# ---- pairs of adapters ----------------------------------------------------------------------------


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


# ---- which adapter answers (without peft's set_adapter, which flips requires_grad) ----------------


def tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
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
    layers = tuner_layers(model) if layers is None else layers
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
    layers = tuner_layers(model) if layers is None else layers
    peft_marker, tuner_marker, layer_markers = previous
    model.active_adapter = peft_marker
    model.base_model.active_adapter = tuner_marker
    for module, marker in zip(layers, layer_markers, strict=True):
        module._active_adapter = marker


@contextlib.contextmanager
def use_adapter(model: PeftModel, name: str, layers: list[BaseTunerLayer] | None = None) -> Iterator[None]:
    """Run the block with adapter `name` active; restore the previous adapter after. No grad flag changes."""
    layers = tuner_layers(model) if layers is None else layers
    previous = activate_adapter(model, name, layers)
    try:
        yield
    finally:
        restore_active_adapter(model, previous, layers)
