"""Resolve a config's task sequence and load each task's train and test data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retain.data.builtin import resolve_dataset_dir, shipped_benchmark, shipped_benchmarks
from retain.data.prompt import IGNORE_INDEX, PromptBuilder, normalize_answer
from retain.data.registry import Example, benchmark_tasks, is_bio_tag, load_dataset_info, load_examples
from retain.errors import DataError
from retain.hparams.args import DataArguments

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    name: str
    train: list[Example]
    test: list[Example]
    #: The normalised `label_list` of the task's registry entry: a classification task has one. None: the
    #: task is scored by exact match and ROUGE-L over every test row.
    labels: list[str] | None
    spec: dict[str, Any] = field(default_factory=dict)
    #: The `label_list` as written (what the model learns to answer), one per normalised label.
    label_texts: list[str] | None = None
    #: Word-level (`formatting: tagging`) tasks: the BIO tags of the train split (or `label_list`),
    #: sorted, exactly as written. None for other tasks.
    tags: list[str] | None = None
    train_rows: list[dict[str, list[int]]] = field(default_factory=list)
    truncated_rows: int = 0
    dropped_rows: int = 0


def task_sequence(data: DataArguments) -> tuple[Path, list[str]]:
    """The dataset directory and the ordered task names."""
    if data.benchmark:
        bench_dir = benchmark_folder(data)
        return bench_dir, benchmark_tasks(bench_dir, data.benchmark, data.benchmark_order or "")
    assert data.cl_tasks
    if len(set(data.cl_tasks)) != len(data.cl_tasks):
        raise DataError("a task is listed twice", field="cl_tasks")
    return resolve_dataset_dir(data.dataset_dir), list(data.cl_tasks)


def benchmark_folder(data: DataArguments) -> Path:
    """`benchmark_dir` when given; else the copy shipped with retain (`benchmark: LNT`); else `dataset_dir`."""
    if data.benchmark_dir:
        return resolve_dataset_dir(data.benchmark_dir)
    shipped = shipped_benchmark(data.benchmark or "")
    if shipped is not None:
        return shipped
    folder = resolve_dataset_dir(data.dataset_dir)
    if not (folder / "benchmark_info.json").is_file():
        raise DataError(
            f"no benchmark '{data.benchmark}' ships with retain (shipped: {', '.join(shipped_benchmarks())}), "
            f"and {folder / 'benchmark_info.json'} does not exist: set benchmark_dir to a folder that holds one",
            field="benchmark",
        )
    return folder


def load_task(dataset_dir: Path, info: dict[str, Any], name: str, data: DataArguments) -> TaskData:
    train = load_examples(dataset_dir, info, name)
    test_name = f"{name}_{data.eval_split}"
    if test_name not in info:
        raise DataError(
            f"task '{name}' has no {data.eval_split} split: add an entry '{test_name}'",
            source=str(dataset_dir / "dataset_info.json"),
            field=test_name,
        )
    test = load_examples(dataset_dir, info, test_name)
    if data.max_samples:
        train = train[: data.max_samples]
    if data.eval_max_samples:
        test = test[: data.eval_max_samples]
    spec = info[name]
    labels = spec.get("label_list")
    if labels is not None:
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise DataError(
                "'label_list' must be a non-empty list of strings",
                source=str(dataset_dir / "dataset_info.json"),
                field=name,
            )
    if spec.get("formatting") == "tagging":
        return TaskData(
            name=name,
            train=train,
            test=test,
            labels=None,
            spec=spec,
            tags=_tag_set(train, labels, dataset_dir, name),
        )
    if labels is None:
        return TaskData(name=name, train=train, test=test, labels=None, spec=spec)
    empty = next((x for x in labels if not normalize_answer(x)), None)
    if empty is not None:  # it could never be generated, and choice would score it on no tokens
        raise DataError(
            f"'label_list' entry {empty!r} is empty once spaces and trailing punctuation are removed",
            source=str(dataset_dir / "dataset_info.json"),
            field=name,
        )
    normalised = {normalize_answer(x) for x in labels}
    if test and not any(normalize_answer(e.answer) in normalised for e in test):
        raise DataError(
            f"no {data.eval_split} row of task '{name}' has its answer among 'label_list', so none could be scored",
            source=str(dataset_dir / "dataset_info.json"),
            field=name,
        )
    texts = list({normalize_answer(x): x for x in labels}.values())  # as written, one per normalised label
    return TaskData(
        name=name,
        train=train,
        test=test,
        labels=sorted(normalised),
        spec=spec,
        label_texts=texts,
    )


def _tag_set(train: list[Example], label_list: list[str] | None, dataset_dir: Path, name: str) -> list[str]:
    """A tagging task's tags: its `label_list` (which must cover the train split), else the train split's."""
    seen = {tag for e in train for tag in e.extra["tags"]}
    if label_list is None:
        return sorted(seen)
    registry = str(dataset_dir / "dataset_info.json")
    bad = next((tag for tag in label_list if not is_bio_tag(tag)), None)
    if bad is not None:
        raise DataError(f"'label_list' entry '{bad}' is not O, B-TYPE or I-TYPE", source=registry, field=name)
    missing = sorted(seen - set(label_list))
    if missing:
        raise DataError(
            f"the train split uses tags missing from 'label_list': {', '.join(missing)}",
            source=registry,
            field=name,
        )
    return sorted(set(label_list))


def load_tasks(data: DataArguments) -> list[TaskData]:
    dataset_dir, names = task_sequence(data)
    info = load_dataset_info(dataset_dir)
    return [load_task(dataset_dir, info, name, data) for name in names]


def load_encoded_tasks(
    dataset_dir: str, names: list[str], data: DataArguments, builder: PromptBuilder
) -> list[TaskData]:
    """Tasks outside the run's sequence (e.g. EasyCL's replay_task_list), read and encoded."""
    if not names:
        return []
    folder = resolve_dataset_dir(dataset_dir)
    info = load_dataset_info(folder)
    tasks = [load_task(folder, info, name, data) for name in names]
    for task in tasks:
        encode_task(task, builder, data.cutoff_len)
    return tasks


def encode_task(task: TaskData, builder: PromptBuilder, cutoff_len: int) -> None:
    """Fill `task.train_rows`; rows whose answer is cut away entirely are dropped and counted."""
    rows, truncated, dropped = [], 0, 0
    for example in task.train:
        row = builder.encode_train(example, cutoff_len)
        full = len(builder.prompt_ids(example)) + len(builder.answer_ids(example.answer))
        if full > cutoff_len:
            truncated += 1
        if all(label == IGNORE_INDEX for label in row["labels"][1:]):
            dropped += 1
            continue
        rows.append(row)
    if not rows:
        raise DataError(
            f"every answer of task '{task.name}' is truncated away by cutoff_len={cutoff_len}; raise cutoff_len",
            field="cutoff_len",
        )
    empty = sum(1 for example in task.train if not example.answer.strip())
    if empty:
        logger.warning(
            "task %s: %d of %d train rows have an empty answer (they teach the model to stop at once)",
            task.name,
            empty,
            len(task.train),
        )
    if truncated:
        logger.warning(
            "task %s: %d of %d train rows cut to cutoff_len=%d (%d dropped: no answer left)",
            task.name,
            truncated,
            len(task.train),
            cutoff_len,
            dropped,
        )
    task.train_rows, task.truncated_rows, task.dropped_rows = rows, truncated, dropped
