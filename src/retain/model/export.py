"""What `retain export --merge` writes: full merged models (adapter folders are `save_adapter`'s layout).

An adapter folder is the standard PEFT layout (`adapter_config.json`, `adapter_model.safetensors`)
that `PeftModel.from_pretrained`, LLaMA-Factory's `adapter_name_or_path` and vLLM's LoRA loading
read. A merged model folder is a plain transformers checkpoint (safetensors, config, tokenizer,
generation config) with the adapter added into the base weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from retain.hparams.args import ModelArguments


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
