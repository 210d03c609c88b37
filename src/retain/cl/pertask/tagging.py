"""Word-level tasks: words to token positions, and entity-level scoring of BIO tag sequences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from retain.errors import ModelError


def encode_words(
    tokenizer: PreTrainedTokenizerBase, words: Sequence[str], special_tokens: bool, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of the words joined by spaces, and the position of each word's first token.

    A word whose tokens were all cut away by `max_length` gets position -1. Tokens are matched
    to words through the tokenizer's character offsets, so any fast tokenizer works (WordPiece,
    byte-level BPE, ...); special tokens ([CLS], [SEP]) belong to no word.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("word-level tasks need a fast tokenizer (character offsets)")
    text = " ".join(words)
    bounds, cursor = [], 0
    for word in words:
        bounds.append((cursor, cursor + len(word)))
        cursor += len(word) + 1
    encoded = tokenizer(
        text,
        add_special_tokens=special_tokens,
        return_offsets_mapping=True,
        truncation=True,
        max_length=max_length,
    )
    starts = [-1] * len(words)
    w = 0
    for position, (begin, end) in enumerate(encoded["offset_mapping"]):
        if begin == end:  # a special token
            continue
        while w < len(words) and bounds[w][1] <= begin:
            w += 1
        if w < len(words) and bounds[w][0] < end and starts[w] < 0:
            starts[w] = position
    return list(encoded["input_ids"]), starts


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first word, end word) of every entity in a BIO sequence, read like conlleval.

    An entity starts at B-X, or at I-X after O or after another type; it ends before the next
    B-, O or change of type.
    """
    spans: set[tuple[str, int, int]] = set()
    kind: str | None = None
    start = 0
    for index, tag in enumerate([*tags, "O"]):
        prefix, _, typ = ("O", "", "") if tag == "O" else (tag[0], tag[1], tag[2:])
        if kind is not None and (prefix in ("O", "B") or typ != kind):
            spans.add((kind, start, index))
            kind = None
        if prefix in ("B", "I") and kind is None:
            kind, start = typ, index
    return spans


@dataclass
class EntityScore:
    precision: float
    recall: float
    f1: float
    true_positives: int
    predicted: int
    gold: int


def entity_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> EntityScore:
    """Micro-averaged entity-level precision, recall and F1 over sentences (exact span and type).

    With no gold and no predicted entity at all, every figure is 1.0 (nothing to find, nothing
    wrongly found); with predictions but no gold, precision and F1 are 0.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sequences but {len(predicted)} predicted")
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, predicted, strict=True):
        if len(g) != len(p):
            raise ValueError(f"a gold sequence has {len(g)} tags, its prediction {len(p)}")
        gold_spans, pred_spans = entity_spans(g), entity_spans(p)
        tp += len(gold_spans & pred_spans)
        n_pred += len(pred_spans)
        n_gold += len(gold_spans)
    if n_pred == 0 and n_gold == 0:
        return EntityScore(1.0, 1.0, 1.0, 0, 0, 0)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return EntityScore(precision, recall, f1, tp, n_pred, n_gold)
