"""Load a model and its tokenizer from a local dir, a .gguf file, an offline alias or (explicitly) a hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from retain.errors import ModelError
from retain.hparams.args import ModelArguments
from retain.model.aliases import ALIASES, prepare_alias

logger = logging.getLogger(__name__)


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a float32 safetensors HF directory."""
    model, tokenizer = _load_gguf(gguf_file)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _load_gguf(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # gguf raises a variety of errors on corrupt files
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelError(f"cannot read GGUF file: {reason}", source=str(path)) from None
    # Weights are plain float32 now: drop the quantizer marker so the model trains and saves normally.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, _finish_tokenizer(tokenizer)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))


def load_model(
    args: ModelArguments, kind: str = "causal-lm"
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Return (model, tokenizer). `kind` is 'causal-lm' or 'encoder'."""
    name = args.model_name_or_path
    if name == "tiny-random-llama":
        from retain.model.tiny import build_tiny_llama, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        return build_tiny_llama(tokenizer), tokenizer
    if name in ALIASES:
        path = prepare_alias(name, args.model_cache_dir)
        local_only = True
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError("GGUF file not found", field="model_name_or_path", source=str(path))
            return _load_gguf(path)
        local_only = path.exists()
        if not local_only and not _looks_like_hub_id(name):
            raise ModelError("model path not found", source=str(path), field="model_name_or_path")
        if local_only and not (path / "config.json").is_file():
            raise ModelError(
                "not a model directory (no config.json)", source=str(path), field="model_name_or_path"
            )
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    source = str(path) if local_only else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=False, local_files_only=local_only
        )
        model = auto.from_pretrained(
            source,
            trust_remote_code=False,
            local_files_only=local_only,
            use_safetensors=True,
            dtype=torch.float32,
        )
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()).split(". ")[0][:200]
        if not local_only:
            raise ModelError(
                f"no such local model directory, and fetching '{name}' as a hub id failed ({reason})",
                field="model_name_or_path",
            ) from None
        raise ModelError(f"cannot load model: {reason}", source=source, field="model_name_or_path") from None
    return model, _finish_tokenizer(tokenizer)
