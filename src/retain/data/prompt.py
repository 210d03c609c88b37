"""Prompts through the tokenizer's chat template, and answer-only labels."""

from __future__ import annotations

import re
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from retain.data.registry import Example
from retain.data.templates import TEXT_FORMATS, resolve_format

IGNORE_INDEX = -100


class PromptBuilder:
    """Turns examples into token ids: the prompt (ending where the answer starts) and the answer + EOS.

    `template` is a LLaMA-Factory template name (`retain.data.templates`). A chat template that rejects
    a system turn (Gemma's, for one) gets the system text folded into the first user turn.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str = "auto"):
        self.tokenizer = tokenizer
        self.format = resolve_format(template, getattr(tokenizer, "chat_template", None))
        self.use_chat = self.format.chat_template is not None
        self.fold_system = self.use_chat and not self._accepts_system()

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.format.chat_template, tokenize=False, add_generation_prompt=True
        )

    def _accepts_system(self) -> bool:
        try:
            self._render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        except TemplateError:
            return False
        return True

    def prompt_text(self, example: Example) -> str:
        messages = list(example.messages)
        if self.use_chat:
            if example.system and self.fold_system:
                first = messages[0]
                messages[0] = {**first, "content": f"{example.system}\n\n{first['content']}"}
            elif example.system:
                messages = [{"role": "system", "content": example.system}, *messages]
            return self._render(messages)
        user, assistant, system, separator = TEXT_FORMATS[self.format.text]
        parts = [system.format(content=example.system)] if example.system else []
        for message in messages:
            turn = user if message["role"] == "user" else assistant
            parts.append(turn.format(content=message["content"]))
        parts.append(assistant.format(content=""))
        return separator.join(parts)

    def prompt_ids(self, example: Example) -> list[int]:
        return self.tokenizer(self.prompt_text(example), add_special_tokens=False)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        # Checked here, not in __init__: encoder backbones (classifier heads) have no EOS and need none.
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: generative training and evaluation need one")
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def encode_train(self, example: Example, cutoff_len: int) -> dict[str, list[int]]:
        """Prompt + answer, cut to `cutoff_len` from the right; labels cover the answer only."""
        prompt = self.prompt_ids(example)
        answer = self.answer_ids(example.answer)
        input_ids = (prompt + answer)[:cutoff_len]
        labels = ([IGNORE_INDEX] * len(prompt) + answer)[:cutoff_len]
        return {"input_ids": input_ids, "labels": labels}


_TRAILING_PUNCT = re.compile(r"[\s.,;:!?。]+$")


def normalize_answer(text: str) -> str:
    """Case-folded, surrounding whitespace and trailing punctuation removed."""
    return _TRAILING_PUNCT.sub("", text.strip()).strip().casefold()


def pad_batch(
    rows: list[dict[str, Any]],
    pad_id: int,
    side: str = "right",
    keys: tuple[str, ...] = ("input_ids", "labels"),
) -> dict[str, Any]:
    """Pad variable-length rows into tensors, with an attention mask. Labels pad with -100."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    out: dict[str, list[list[int]]] = {key: [] for key in keys if key in rows[0]}
    out["attention_mask"] = []
    for row in rows:
        gap = width - len(row["input_ids"])
        for key in out:
            if key == "attention_mask":
                continue
            fill = IGNORE_INDEX if key == "labels" else pad_id
            values = list(row[key])
            out[key].append(values + [fill] * gap if side == "right" else [fill] * gap + values)
        mask = [1] * len(row["input_ids"])
        out["attention_mask"].append(mask + [0] * gap if side == "right" else [0] * gap + mask)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in out.items()}


class TrainCollator:
    """Right-pads encoded training rows."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return pad_batch(rows, self.pad_id, side="right")
