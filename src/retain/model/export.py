"""What `retain export` writes: PEFT adapter folders, one LoRA merged from a stack, full merged models.

An adapter folder is the standard PEFT layout (`adapter_config.json`, `adapter_model.safetensors`)
that `PeftModel.from_pretrained`, LLaMA-Factory's `adapter_name_or_path` and vLLM's LoRA loading
read. A merged model folder is a plain transformers checkpoint (safetensors, config, tokenizer,
generation config) with the adapter added into the base weights.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from retain.errors import ModelError
from retain.hparams.args import ModelArguments
from retain.model.adapters import ADAPTER_WEIGHTS


def concatenated_lora(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One LoRA whose update equals the sum of several: A stacked by rows, B by columns.

    With A_i of shape [r, d_in] and B_i of shape [d_out, r], `[B_1 .. B_k] [A_1; ..; A_k] = sum_i B_i A_i`.
    """
    merged = {}
    for key in states[0]:
        parts = [state[key] for state in states]
        if ".lora_A." in key:
            merged[key] = torch.cat(parts, dim=0)
        elif ".lora_B." in key:
            merged[key] = torch.cat(parts, dim=1)
        else:
            raise ModelError(f"cannot merge adapter tensor {key}: only LoRA's A and B can be stacked")
    return merged


def save_stacked_lora(model: PeftModel, names: list[str], directory: Path) -> None:
    """Write the adapters `names` (same rank, alpha and targets) as one LoRA of rank sum(r): exact, since
    its scale alpha'/r' = (k alpha)/(k r) is each one's."""
    configs = [model.peft_config[name] for name in names]
    first = configs[0]
    for config in configs[1:]:
        if (config.r, config.lora_alpha, config.target_modules) != (
            first.r,
            first.lora_alpha,
            first.target_modules,
        ):
            raise ModelError(
                "the stacked LoRAs differ in rank, alpha or targets; they cannot become one LoRA"
            )
    if first.use_rslora or first.rank_pattern or first.alpha_pattern:
        raise ModelError(
            "rsLoRA or per-layer ranks change the scale of a merged LoRA; export the adapters one by one"
        )
    states = [get_peft_model_state_dict(model, adapter_name=name) for name in names]
    merged = concatenated_lora([{k: v.detach().float().cpu() for k, v in s.items()} for s in states])
    config = copy.deepcopy(first)
    config.r, config.lora_alpha = first.r * len(names), first.lora_alpha * len(names)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(directory / ADAPTER_WEIGHTS))
    config.save_pretrained(str(directory))


def save_merged_model(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, adapter_dir: Path, out: Path
) -> list[str]:
    """Load the base again (not quantized), add the adapter in `adapter_dir` into its weights, and save a
    full model folder at `out`. Returns notes for the user (a quantized run merges into a dequantized base)."""
    from retain.model.loader import load_model

    notes = []
    if model_args.quantization_bit:
        notes.append(
            f"the run trained on a {model_args.quantization_bit}-bit base; the adapter is merged into the "
            "base loaded without quantization (in its torch_dtype), so the merged model is not quantized"
        )
    base, _ = load_model(dataclasses.replace(model_args, quantization_bit=None, device_map=None))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return notes
