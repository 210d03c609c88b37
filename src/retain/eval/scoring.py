"""How a matrix entry is scored from predictions: pure functions over strings.

- A classification task (its registry entry has a `label_list`): accuracy over the test rows whose
  gold answer is one of the labels, after normalisation. Rows whose gold answer is not a label (MNLI's
  `-`) are not scored; they are counted (`unlabeled`) and shown in the report. Predictions that are
  no label at all are wrong, and their share is kept as `off_label` (the model answered out of format).
- Any other task: exact match after normalisation over every row (the matrix entry), and the mean
  ROUGE-L F1 (the `rouge-score` package, with a Unicode word tokenizer) as the extra figure `rouge_l`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from retain.data.prompt import normalize_answer

_WORD = re.compile(r"\w+")


@dataclass
class Score:
    """One matrix entry: a score in [0, 1] (accuracy, or F1 for word-level tasks) and its counts."""

    accuracy: float
    correct: int
    scored: int
    #: Test rows whose gold answer is not in the task's label set (for example MNLI's "-"): not scored.
    unlabeled: int
    #: Per test row, the predicted answer (written to predictions/ for inspection), when available.
    predictions: list[str] | None = None
    #: Further named figures of this entry, each in [0, 1] (for example a router's task-identification
    #: accuracy). The task loop keeps one matrix per name next to the main one (`extra_matrices`).
    extra: dict[str, float] = field(default_factory=dict)
    #: Whether `correct / scored` is the accuracy over test rows (False for an F1 over entities), so that
    #: entries can be pooled over rows (the micro averages).
    row_accuracy: bool = True


class _WordTokenizer:
    """rouge-score's tokenizer interface; its default keeps ASCII letters and digits only."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


def rouge_l(predictions: list[str], answers: list[str]) -> float:
    """Mean ROUGE-L F1 of each prediction against its answer."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    values = [scorer.score(a, p)["rougeL"].fmeasure for p, a in zip(predictions, answers, strict=True)]
    return sum(values) / len(values)


def score(predictions: list[str], answers: list[str], labels: list[str] | None) -> Score:
    """Score predictions against gold answers; `labels`: the task's normalised label set, or None."""
    if not answers:
        raise ValueError("no test rows to score")
    if labels is None:
        correct = sum(
            normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers, strict=True)
        )
        extra = {"rouge_l": rouge_l(predictions, answers)}
        return Score(correct / len(answers), correct, len(answers), 0, extra=extra)
    label_set = set(labels)
    correct = scored = unlabeled = off_label = 0
    for prediction, answer in zip(predictions, answers, strict=True):
        gold = normalize_answer(answer)
        if gold not in label_set:
            unlabeled += 1
            continue
        scored += 1
        guess = normalize_answer(prediction)
        correct += guess == gold
        off_label += guess not in label_set
    if scored == 0:
        raise ValueError("no test row has a gold answer in the task's label set")
    return Score(correct / scored, correct, scored, unlabeled, extra={"off_label": off_label / scored})
