"""Classification rows of `peft` with heads: token ids and targets of train and test rows, and batching.

Sentence level: one label per row, the index of the row's answer in the task's own labels.
Word level: one label per token, on the first token of each word (other tokens are ignored).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from retain.cl.pertask.tagging import encode_words
from retain.data.prompt import IGNORE_INDEX, PromptBuilder, normalize_answer, pad_batch
from retain.errors import DataError


class HeadCollator:
    """Right-pads classification rows; sentence labels are one index per row, word labels one per token."""

    def __init__(self, pad_id: int, word_level: bool):
        self.pad_id = pad_id
        self.word_level = word_level

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.word_level:
            return pad_batch(rows, self.pad_id, side="right", keys=("input_ids", "labels"))
        batch = pad_batch(rows, self.pad_id, side="right", keys=("input_ids",))
        batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=torch.long)
        return batch


@dataclasses.dataclass
class EvalRows:
    input_ids: list[list[int]]
    #: sentence level: the gold class index in the task's labels (-1: not a label, not scored);
    #: word level: the first-token position of every word (-1: cut away)
    targets: list[Any]


def own_labels(data, word_level: bool) -> list[str]:
    """A task's own classes (sentence level) or tags (word level), checked against the task's format."""
    if word_level:
        if data.tags is None:
            raise DataError(
                f"task '{data.name}' is not a word-level task: word-level classification needs "
                "`formatting: tagging` data",
                field="classification_type",
            )
        return list(data.tags)
    if data.tags is not None:
        raise DataError(
            f"task '{data.name}' is a tagging task: set classification_type: word-level",
            field="classification_type",
        )
    if data.labels is not None:
        return list(data.labels)
    # No label_list: a classifier's classes are the task's distinct train answers.
    return sorted({normalize_answer(e.answer) for e in data.train})


class RowEncoder:
    """Token ids and targets of a task's rows, for one tokenizer and `cutoff_len`."""

    def __init__(self, builder: PromptBuilder, cutoff_len: int, word_level: bool):
        self.builder = builder
        self.tokenizer = builder.tokenizer
        self.cutoff_len = cutoff_len
        self.word_level = word_level
        #: BERT-style encoders get `[CLS] text [SEP]`; decoders get the chat-template prompt
        self.encoder_style = self.tokenizer.cls_token_id is not None
        self._tests: dict[str, EvalRows] = {}

    def sentence_ids(self, example) -> tuple[list[int], bool]:
        """Encoders: [CLS] text [SEP] cut from the right; decoders: the prompt cut from the left (its end is the feature)."""
        if self.encoder_style:
            parts = ([example.system] if example.system else []) + [m["content"] for m in example.messages]
            full = self.tokenizer("\n".join(parts), add_special_tokens=True)["input_ids"]
            if len(full) <= self.cutoff_len:
                return full, False
            cut = self.tokenizer(
                "\n".join(parts), add_special_tokens=True, truncation=True, max_length=self.cutoff_len
            )["input_ids"]
            return cut, True
        ids = self.builder.prompt_ids(example)
        return ids[-self.cutoff_len :], len(ids) > self.cutoff_len

    def word_ids(self, example) -> tuple[list[int], list[int]]:
        return encode_words(self.tokenizer, example.extra["tokens"], self.encoder_style, self.cutoff_len)

    def train_rows(self, data, labels: list[str]) -> tuple[list[dict[str, Any]], int, int]:
        """The task's train rows, how many were truncated, and how many were dropped (no label left)."""
        position = {label: i for i, label in enumerate(labels)}
        rows, dropped, truncated = [], 0, 0
        for example in data.train:
            if self.word_level:
                ids, starts = self.word_ids(example)
                row_labels = [IGNORE_INDEX] * len(ids)
                for tag, start in zip(example.extra["tags"], starts, strict=True):
                    if start >= 0:
                        row_labels[start] = position[tag]
                truncated += min(starts) < 0
                if all(label == IGNORE_INDEX for label in row_labels):
                    dropped += 1
                    continue
                rows.append({"input_ids": ids, "labels": row_labels})
            else:
                ids, cut = self.sentence_ids(example)
                truncated += cut
                gold = position.get(normalize_answer(example.answer))
                if gold is None:
                    dropped += 1
                    continue
                rows.append({"input_ids": ids, "labels": gold})
        return rows, truncated, dropped

    def test_rows(self, data, labels: list[str]) -> EvalRows:
        """The task's test rows (encoded once per task)."""
        if data.name not in self._tests:
            ids, targets = [], []
            position = {label: i for i, label in enumerate(labels)}
            for example in data.test:
                if self.word_level:
                    row, starts = self.word_ids(example)
                    ids.append(row)
                    targets.append(starts)
                else:
                    ids.append(self.sentence_ids(example)[0])
                    targets.append(position.get(normalize_answer(example.answer), -1))
            self._tests[data.name] = EvalRows(ids, targets)
        return self._tests[data.name]
