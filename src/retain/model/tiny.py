"""`tiny-random-<arch>`: deterministic tiny random models of six architectures, built in code.

Each has a byte-level tokenizer (one token per byte, so any text round-trips) with its family's
special tokens and a chat template in its family's style. They are for tests and smoke runs: no
download, a few hundred thousand parameters, the same code paths as the real models (GPT-2's
Conv1D layers and fused attention, Phi-3's fused projections, Gemma-2's soft-capping and its
template without a system role, end-of-turn tokens that differ from EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_MISTRAL = (
    "{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.first and system %}{{ system }}\n\n{% endif %}"
    "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
_GPT2 = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Gemma's own templates refuse a system turn; retain folds the system text into the first user turn.
_GEMMA = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class TinyFamily:
    config: type[PretrainedConfig]
    chat_template: str
    eos: str
    specials: tuple[str, ...]
    #: Extra stop tokens of the generation config (end-of-turn tokens other than EOS).
    end_of_turn: tuple[str, ...] = ()
    #: Architecture-specific config values (sizes are shared, see `_sizes`).
    extra: tuple[tuple[str, object], ...] = ()


FAMILIES: dict[str, TinyFamily] = {
    "llama": TinyFamily(LlamaConfig, _CHATML, "<|im_end|>", ("<|im_start|>",)),
    "qwen2": TinyFamily(Qwen2Config, _CHATML, "<|im_end|>", ("<|im_start|>",)),
    "mistral": TinyFamily(MistralConfig, _MISTRAL, "</s>", ("[INST]", "[/INST]")),
    "gpt2": TinyFamily(GPT2Config, _GPT2, "<|endoftext|>", ()),
    "phi3": TinyFamily(
        Phi3Config,
        _PHI3,
        "<|endoftext|>",
        ("<|user|>", "<|assistant|>", "<|system|>"),
        end_of_turn=("<|end|>",),
    ),
    "gemma2": TinyFamily(
        Gemma2Config,
        _GEMMA,
        "<eos>",
        ("<start_of_turn>",),
        end_of_turn=("<end_of_turn>",),
        extra=(("head_dim", 16), ("query_pre_attn_scalar", 16), ("sliding_window", 64)),
    ),
}
ARCHITECTURES = tuple(FAMILIES)


def build_tiny_tokenizer(arch: str = "llama") -> PreTrainedTokenizerFast:
    """One token per byte (no merges), plus the family's special tokens and chat template."""
    family = FAMILIES[arch]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={symbol: index for index, symbol in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=family.eos,
        pad_token="<|pad|>",
        additional_special_tokens=[*family.specials, *family.end_of_turn],
    )
    tokenizer.chat_template = family.chat_template
    return tokenizer


def _sizes(arch: str, tokenizer: PreTrainedTokenizerFast) -> dict[str, object]:
    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    if arch == "gpt2":
        return {**common, "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 2048}
    return {
        **common,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
    }


def build_tiny_model(arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    family = FAMILIES[arch]
    config = family.config(**_sizes(arch, tokenizer), **dict(family.extra))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    stops = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(family.end_of_turn))]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.bos_token_id = None
    return model.eval()


def build_tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    return build_tiny_model("llama", tokenizer, seed)
