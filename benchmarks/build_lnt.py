"""Build the compact LNT copy that ships inside the package, from the source folder.

    python benchmarks/build_lnt.py [../shared/benchmarks/LNT]

Writes src/retain/data/benchmarks/LNT/: `benchmark_info.json`, `dataset_info.json` and one gzipped
JSON file per task and split (`<task>/<task>_{train,dev,test}.json.gz`). For each task:
- `label_list` (in the registry entry) is the options its instruction lists ("Option: a, b" or
  "Choose one between A and B"), checked against every answer of the train split;
- the dev split is cut from the train rows: `min(200, n // 10)` rows drawn with a fixed seed from the
  second half of the train file, so the first half keeps its order (a run with `max_samples` up to
  n/2 trains on the same rows as on the source folder) and no dev row is ever trained on. The
  published dev files equal the test files, so they are not used;
- the test split is the source's, unchanged.
The output is deterministic: building twice gives the same bytes.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "src" / "retain" / "data" / "benchmarks" / "LNT"
DEV_SEED = 0
DEV_ROWS = 200


def label_list(instruction: str) -> list[str]:
    """The answer options an LNT instruction lists."""
    options = re.search(r"Option: (.+?)\s*$", instruction)
    if options:
        return [part.strip() for part in options.group(1).split(",")]
    between = re.search(r"Choose one between (\w+) and (\w+)\.", instruction)
    if between:
        return [between.group(1), between.group(2)]
    raise ValueError(f"no options in instruction: {instruction[:120]!r}")


def dev_indices(count: int) -> list[int]:
    size = min(DEV_ROWS, count // 10)
    second_half = list(range(count // 2, count))
    return sorted(random.Random(DEV_SEED).sample(second_half, size))


def gz_bytes(rows: list[dict]) -> bytes:
    text = json.dumps(rows, ensure_ascii=False, separators=(",", ":")) + "\n"
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def build(source: Path, target: Path = TARGET) -> dict[str, dict]:
    info = json.loads((source / "dataset_info.json").read_text())
    bench = json.loads((source / "benchmark_info.json").read_text())
    tasks = sorted(name for name in info if not name.endswith("_test"))
    registry: dict[str, dict] = {}
    for task in tasks:
        train = json.loads((source / info[task]["file_name"]).read_text(encoding="utf-8"))
        test = json.loads((source / info[f"{task}_test"]["file_name"]).read_text(encoding="utf-8"))
        labels = sorted({tuple(label_list(row["instruction"])) for row in train})
        if len(labels) != 1:
            raise ValueError(f"{task}: rows list different options: {labels}")
        labels = list(labels[0])
        unknown = {row["output"] for row in train} - set(labels)
        if unknown:
            raise ValueError(f"{task}: train answers {sorted(unknown)} are not among the options {labels}")
        dev = set(dev_indices(len(train)))
        splits = {
            "train": [row for i, row in enumerate(train) if i not in dev],
            "dev": [row for i, row in enumerate(train) if i in dev],
            "test": test,
        }
        for split, rows in splits.items():
            path = target / task / f"{task}_{split}.json.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gz_bytes(rows))
            entry = task if split == "train" else f"{task}_{split}"
            registry[entry] = {"file_name": f"{task}/{task}_{split}.json.gz", "formatting": "alpaca"}
            if split == "train":
                registry[entry]["label_list"] = labels
    (target / "dataset_info.json").write_text(json.dumps(registry, indent=1) + "\n")
    (target / "benchmark_info.json").write_text(json.dumps(bench, indent=1) + "\n")
    return registry


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT.parent / "shared" / "benchmarks" / "LNT")
    registry = build(source)
    size = sum(p.stat().st_size for p in TARGET.rglob("*") if p.is_file())
    print(f"wrote {len(registry)} entries to {TARGET} ({size / 2**20:.1f} MiB)")
