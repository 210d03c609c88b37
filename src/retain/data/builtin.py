"""Built-in task families, generated deterministically by our own code (no downloads).

`dataset_dir: builtin://demo` names them in a config; the files are written once into the
cache (`$RETAIN_CACHE/data/<family>-v<version>`) in the usual `dataset_info.json` layout.

The demo family: three tasks over the same words (fruits, animals, vehicles). Each maps the
word's group to one of the same three colours, with a different made-up mapping per task and
a different instruction. A small model learns each mapping in about a minute; since the tasks
share inputs and answers and differ only in the instruction, sequential fine-tuning overwrites
the earlier mappings, so forgetting is easy to see.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from retain.data.ner import NER_VERSION, ner_rows
from retain.io import atomic_dir, cache_root

PREFIX = "builtin://"

WORDS = {
    "fruit": "apple banana cherry grape lemon mango melon orange peach pear plum kiwi apricot lime fig papaya "
    "coconut guava raspberry strawberry blueberry pineapple nectarine tangerine watermelon pomegranate "
    "cranberry blackberry date lychee".split(),
    "animal": "dog cat horse cow sheep goat lion tiger bear wolf fox rabbit deer monkey zebra giraffe elephant "
    "camel donkey mouse squirrel otter beaver leopard panda kangaroo hamster moose badger hedgehog".split(),
    "vehicle": "car bus truck bicycle motorcycle train tram taxi van scooter tractor ambulance lorry jeep "
    "minibus limousine trolleybus subway helicopter airplane boat ship ferry canoe yacht submarine "
    "skateboard sled wagon caravan".split(),
}

DEMO_TASKS = {
    "paint_colour": (
        "Which paint colour belongs to the word's group? Reply with one colour.",
        {"fruit": "red", "animal": "blue", "vehicle": "green"},
    ),
    "flag_colour": (
        "Which flag colour belongs to the word's group? Reply with one colour.",
        {"fruit": "blue", "animal": "green", "vehicle": "red"},
    ),
    "badge_colour": (
        "Which badge colour belongs to the word's group? Reply with one colour.",
        {"fruit": "green", "animal": "red", "vehicle": "blue"},
    ),
}
DEMO_VERSION = 1
DEMO_TEST_WORDS = 8  # per group; the other words are for training


def demo_rows(seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """{entry name: rows} for the three demo tasks (train and test splits with disjoint words)."""
    rng = random.Random(seed)
    train_words, test_words = [], []
    for group, words in WORDS.items():
        shuffled = words[:]
        rng.shuffle(shuffled)
        test_words += [(w, group) for w in shuffled[:DEMO_TEST_WORDS]]
        train_words += [(w, group) for w in shuffled[DEMO_TEST_WORDS:]]
    out: dict[str, list[dict[str, str]]] = {}
    for task, (instruction, codes) in DEMO_TASKS.items():
        for split, words in (("train", train_words), ("test", test_words)):
            rows = [{"instruction": instruction, "input": f"Word: {w}", "output": codes[g]} for w, g in words]
            rng.shuffle(rows)
            out[task if split == "train" else f"{task}_test"] = rows
    return out


def _write_family(rows: dict[str, list[dict]], target: Path, formatting: str = "alpaca") -> None:
    with atomic_dir(target) as tmp:
        info = {}
        for name, data in rows.items():
            (tmp / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
            info[name] = {
                "file_name": f"{name}.json",
                "formatting": formatting,
                "split": "test" if name.endswith("_test") else "train",
            }
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")


FAMILIES: dict[str, tuple[int, Callable[[], dict[str, list[dict]]]]] = {
    "demo": (DEMO_VERSION, demo_rows),
    "ner": (NER_VERSION, ner_rows),  # word-level tasks, see retain.data.ner
}
#: The registry `formatting` of a family's rows, when not alpaca.
FAMILY_FORMATTING = {"ner": "tagging"}


#: Benchmarks shipped inside the package (compact copies built by benchmarks/build_lnt.py).
SHIPPED_BENCHMARKS = Path(__file__).parent / "benchmarks"


def shipped_benchmarks() -> dict[str, Path]:
    """Benchmark name -> the shipped folder holding it."""
    return {p.name: p for p in sorted(SHIPPED_BENCHMARKS.iterdir()) if (p / "benchmark_info.json").is_file()}


def shipped_benchmark(name: str) -> Path | None:
    return shipped_benchmarks().get(name)


def resolve_dataset_dir(dataset_dir: str) -> Path:
    """A folder path as is; `builtin://<family>` generated into the cache on first use."""
    if not dataset_dir.startswith(PREFIX):
        return Path(dataset_dir)
    from retain.errors import ConfigError

    family = dataset_dir[len(PREFIX) :]
    if family not in FAMILIES:
        raise ConfigError(
            f"unknown built-in dataset '{family}' (known: {', '.join(FAMILIES)})", field="dataset_dir"
        )
    version, make = FAMILIES[family]
    target = cache_root() / "data" / f"{family}-v{version}"
    if not (target / "dataset_info.json").is_file():
        _write_family(make(), target, FAMILY_FORMATTING.get(family, "alpaca"))
    return target
