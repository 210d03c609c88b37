"""Load a model and its tokenizer from a local dir, a .gguf file, an offline alias or (explicitly) a hub id."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from retain.errors import ModelError
from retain.hparams.args import ATTENTION, ModelArguments
from retain.model.aliases import ALIASES, TINY_ARCHITECTURES, TINY_PREFIX, prepare_alias

logger = logging.getLogger(__name__)


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a float32 safetensors HF directory."""
    model, tokenizer = _load_gguf(gguf_file)
    _save_in_this_process(model, out_dir)
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


def _save_in_this_process(model: torch.nn.Module, folder: Path) -> None:
    """Write `model` as a checkpoint folder from any process: once a process group is up,
    `save_pretrained` writes on rank 0 only, and every process here needs its own copy."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tensors, stored = {}, set()
    for key, tensor in model.state_dict().items():
        place = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if place not in stored:  # a tied weight is stored once, under its first name
            stored.add(place)
            tensors[key] = tensor.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))


def load_options(args: ModelArguments) -> dict[str, Any]:
    """`from_pretrained` keywords for the config's dtype, attention kernel, placement and quantization."""
    on_gpu = torch.cuda.is_available()
    dtype: Any = (
        ("auto" if on_gpu else torch.float32)
        if args.torch_dtype == "auto"
        else getattr(torch, args.torch_dtype)
    )
    options: dict[str, Any] = {"dtype": dtype}
    if ATTENTION[args.flash_attn]:
        options["attn_implementation"] = ATTENTION[args.flash_attn]
    if args.device_map:
        options["device_map"] = args.device_map
    if args.quantization_bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelError(
                "needs the bitsandbytes package: pip install bitsandbytes", field="quantization_bit"
            ) from None
        from transformers import BitsAndBytesConfig

        compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16  # "auto" is GPU-only
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=args.quantization_bit == 4,
            load_in_8bit=args.quantization_bit == 8,
            bnb_4bit_quant_type=args.quantization_type,
            bnb_4bit_use_double_quant=args.double_quantization,
            bnb_4bit_compute_dtype=compute,
        )
    return options


def load_model(
    args: ModelArguments, kind: str = "causal-lm"
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Return (model, tokenizer). `kind` is 'causal-lm' or 'encoder'.

    The base weights come in the config's dtype, attention kernel and placement, quantized to 4 or 8
    bits when `quantization_bit` is set (then prepared for k-bit training: norms in float32, base frozen).
    """
    model, tokenizer = _load(args, kind)
    if args.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


def _load(args: ModelArguments, kind: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    name = args.model_name_or_path
    options = load_options(args)
    if name.startswith(TINY_PREFIX) and name.removeprefix(TINY_PREFIX) in TINY_ARCHITECTURES:
        from retain.model.tiny import build_tiny_model, build_tiny_tokenizer

        arch = name.removeprefix(TINY_PREFIX)
        tokenizer = build_tiny_tokenizer(arch)
        model = build_tiny_model(arch, tokenizer)
        if options == {"dtype": torch.float32}:
            return model, tokenizer
        with tempfile.TemporaryDirectory() as folder:  # through from_pretrained, as a real checkpoint loads
            _save_in_this_process(model, Path(folder))
            return AutoModelForCausalLM.from_pretrained(folder, **options), tokenizer
    if name in ALIASES:
        with PartialState().local_main_process_first():  # one process per machine fills the cache
            path = prepare_alias(name, args.model_cache_dir)
        local_only = True
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError("GGUF file not found", field="model_name_or_path", source=str(path))
            if set(options) != {"dtype"} or options["dtype"] not in (torch.float32, "auto"):
                raise ModelError(
                    "a .gguf file loads as float32 only; for another dtype or quantization, convert it once "
                    "(an alias does: `retain models --prepare NAME`) and load the converted folder",
                    field="model_name_or_path",
                )
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
            **options,
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
