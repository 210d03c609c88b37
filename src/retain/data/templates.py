"""Prompt formats by LLaMA-Factory's template names.

`template: auto` uses the tokenizer's own chat template (plain text when it has none). A chat
family name (`llama3`, `qwen`, `chatml`, `mistral`, `gemma`) uses the tokenizer's own template when
that template is of the same family, and otherwise the format written here. `alpaca`/`plain`,
`default` and `empty` are text formats without a chat template. Any other name is read as `auto`
(the config parser says so in a note).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Text formats: how a user turn, an assistant turn and the system text are written.
TEXT_FORMATS = {
    # Our plain format is alpaca's: "### Instruction:" / "### Response:" blocks.
    "plain": ("### Instruction:\n{content}", "### Response:\n{content}", "{content}", "\n\n"),
    "alpaca": ("### Instruction:\n{content}", "### Response:\n{content}", "{content}", "\n\n"),
    "default": ("Human: {content}", "Assistant: {content}", "System: {content}", "\n"),
    "empty": ("{content}", "{content}", "{content}", ""),
}

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + _CHATML
)
_LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_MISTRAL = (
    "<s>{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.first and system %}{{ system }}\n\n{% endif %}"
    "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
_GEMMA = (
    "<bos>{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

#: Chat families: (a marker found in a tokenizer's own template of that family, our template).
CHAT_FAMILIES = {
    "chatml": ("<|im_start|>", _CHATML),
    "qwen": ("<|im_start|>", _QWEN),
    "llama3": ("<|start_header_id|>", _LLAMA3),
    "mistral": ("[INST]", _MISTRAL),
    "gemma": ("<start_of_turn>", _GEMMA),
}


@dataclass(frozen=True)
class PromptFormat:
    """A resolved format: a chat template (Jinja) or a text format name."""

    chat_template: str | None = None
    text: str | None = None
    #: Whether the tokenizer's own chat template is used.
    own: bool = False


def resolve_format(name: str, own_template: str | None) -> PromptFormat:
    """The format that `template: name` means for a tokenizer whose chat template is `own_template`."""
    if name in TEXT_FORMATS:
        return PromptFormat(text=name)
    if name in CHAT_FAMILIES:
        marker, ours = CHAT_FAMILIES[name]
        if own_template and marker in own_template:
            return PromptFormat(chat_template=own_template, own=True)
        return PromptFormat(chat_template=ours)
    if own_template:  # auto, or a name we do not know
        return PromptFormat(chat_template=own_template, own=True)
    return PromptFormat(text="plain")
