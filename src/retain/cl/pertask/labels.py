"""Label spaces: each task's own classes and their place in the global (class-incremental) space.

Sentence-level: task t's head predicts the task's own labels (its train split's answers or its
`label_list`). The global space concatenates the tasks' label lists in task order, so the same
label text in two tasks gives two global classes (as in the seed: CIL must also identify the task).

Word-level (BIO tags): the global space starts with "O" (index 0). Task 0's head predicts "O"
plus task 0's tags; task t > 0's head predicts only the tags that no earlier task had, and its "O"
logit comes from task 0's adapter and head.

In both, `ACCUM_NUM_CLASS[t]` is the size of the global space after task t and
`PRE_ACCUM_NUM_CLASS[t]` the size before it (0 for task 0), as in the seed.
"""

from __future__ import annotations

from typing import Any

import torch

from retain.data.prompt import IGNORE_INDEX
from retain.errors import DataError, RetainError

O_TAG = "O"


class LabelSpace:
    def __init__(self, level: str):
        if level not in ("sentence-level", "word-level"):
            raise ValueError(f"unknown classification type '{level}'")
        self.level = level
        self.names: dict[int, str] = {}
        #: task index -> the task's own labels (sentence level: classes; word level: its tag set)
        self.labels: dict[int, list[str]] = {}

    @property
    def word_level(self) -> bool:
        return self.level == "word-level"

    def set_task(self, index: int, name: str, labels: list[str]) -> None:
        if not labels:
            raise DataError(f"task '{name}' has no labels")
        if index in self.labels and (self.names[index], self.labels[index]) != (name, list(labels)):
            raise DataError(
                f"task {index} is '{self.names[index]}' with labels {self.labels[index]} in the saved state, "
                f"but '{name}' with labels {list(labels)} here"
            )
        self.names[index] = name
        self.labels[index] = list(labels)

    def _need(self, upto: int) -> None:
        missing = [i for i in range(upto + 1) if i not in self.labels]
        if missing:
            raise RetainError(
                f"the labels of task(s) {', '.join(str(i + 1) for i in missing)} are unknown: "
                "continue from the previous task's directory (previous_task_model)"
            )

    # ---- per task --------------------------------------------------------------------------
    def head_labels(self, t: int) -> list[str]:
        """What task t's head predicts, in head-output order."""
        self._need(t)
        if not self.word_level:
            return list(self.labels[t])
        if t == 0:
            return [O_TAG, *[tag for tag in self.labels[0] if tag != O_TAG]]
        earlier = {tag for j in range(t) for tag in self.labels[j]}
        new = [tag for tag in self.labels[t] if tag != O_TAG and tag not in earlier]
        if not new:
            raise DataError(
                f"word-level task '{self.names[t]}' adds no new tag: its head would have no class"
            )
        return new

    def til_labels(self, t: int) -> list[str]:
        """Task t's TIL classes: its head's, with the "O" from task 0 in front for word-level t > 0."""
        head = self.head_labels(t)
        return [O_TAG, *head] if self.word_level and t > 0 else head

    def accum(self, upto: int) -> list[int]:
        """ACCUM_NUM_CLASS for tasks 0..upto."""
        total, out = 0, []
        for t in range(upto + 1):
            total += len(self.head_labels(t))
            out.append(total)
        return out

    def pre_accum(self, upto: int) -> list[int]:
        """PRE_ACCUM_NUM_CLASS for tasks 0..upto."""
        return [0, *self.accum(upto)[:-1]]

    def global_labels(self, upto: int) -> list[tuple[int, str]]:
        """The global space after task `upto`: (owning task, label) per global index."""
        return [(t, label) for t in range(upto + 1) for label in self.head_labels(t)]

    def til_to_global(self, t: int) -> list[int]:
        """Global index of each of task t's TIL classes."""
        pre = self.pre_accum(t)[t]
        head = range(len(self.head_labels(t)))
        if self.word_level and t > 0:
            return [0, *[pre + j for j in head]]
        return [pre + j for j in head]

    def own_to_global(self, t: int) -> list[int]:
        """Global index of each of task t's own labels (`labels[t]`, the order rows are encoded in)."""
        index = {label: g for g, (_, label) in enumerate(self.global_labels(t))} if self.word_level else None
        if index is None:
            pre = self.pre_accum(t)[t]
            return [pre + j for j in range(len(self.labels[t]))]
        return [index[tag] for tag in self.labels[t]]

    # ---- state -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "tasks": [
                {"index": i, "name": self.names[i], "labels": self.labels[i]} for i in sorted(self.labels)
            ],
        }

    def merge_json(self, data: dict[str, Any]) -> None:
        if data.get("level") != self.level:
            raise RetainError(f"the saved label space is {data.get('level')}, this run is {self.level}")
        for item in data["tasks"]:
            self.set_task(int(item["index"]), item["name"], list(item["labels"]))


def map_word_targets(labels: torch.Tensor, t: int, accum: list[int], pre_accum: list[int]) -> torch.Tensor:
    """Global word-level tag indices -> targets of task t's TIL logits ([O, task t's new tags]).

    The seed's rules: a tag of a later task (index >= ACCUM[t]) and a tag of an earlier task
    (0 < index < PRE_ACCUM[t]) both become "O" (0); for t > 0 the task's own tags move to
    1.. (index - PRE_ACCUM[t] + 1). IGNORE_INDEX positions stay ignored.
    """
    out = labels.clone()
    real = out != IGNORE_INDEX
    out = out.masked_fill(real & (out >= accum[t]), 0)
    out = out.masked_fill(real & (out > 0) & (out < pre_accum[t]), 0)
    if t > 0:
        own = real & (out > 0)
        out[own] = out[own] - pre_accum[t] + 1
    return out
