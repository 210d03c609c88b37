import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spin-waiting
# threads make them many times slower.
torch.set_num_threads(1)

SHARED_LNT = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "LNT"


def write_task_family(
    root: Path, tasks: dict[str, tuple[str, list[tuple[str, str]]]], test_rows: int = 4
) -> Path:
    """Alpaca tasks: {name: (instruction, [(input, output), ...])}; the last `test_rows` rows are the test split."""
    root.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, (instruction, pairs) in tasks.items():
        rows = [{"instruction": instruction, "input": x, "output": y} for x, y in pairs]
        for split, part in (("train", rows[:-test_rows]), ("test", rows[-test_rows:])):
            entry = name if split == "train" else f"{name}_test"
            (root / f"{entry}.json").write_text(json.dumps(part))
            info[entry] = {"file_name": f"{entry}.json", "formatting": "alpaca", "split": split}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def small_tasks(count: int = 3, rows: int = 20) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    labels = [("yes", "no"), ("red", "blue"), ("up", "down"), ("cat", "dog")]
    out = {}
    for t in range(count):
        a, b = labels[t % len(labels)]
        out[f"task{t}"] = (
            f"Task {t}: answer {a} or {b}.",
            [(f"item {i}", a if i % 2 else b) for i in range(rows)],
        )
    return out


def constant_tasks(count: int = 3, rows: int = 20) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Tasks the tiny model learns in a few steps (one answer per task), and then forgets."""
    answers = ["yes", "red", "up", "cat"]
    return {
        f"task{t}": (f"Task {t}.", [(f"item {i}", answers[t % 4]) for i in range(rows)]) for t in range(count)
    }


@pytest.fixture
def learnable_dir(tmp_path: Path) -> Path:
    return write_task_family(tmp_path / "learnable", constant_tasks())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_task_family(tmp_path / "data", small_tasks())


@pytest.fixture
def tiny_config(data_dir: Path, tmp_path: Path):
    """A dict config for a 3-task run on the tiny model; tests override what they need."""

    def make(**overrides):
        values = {
            "model_name_or_path": "tiny-random-llama",
            "dataset_dir": str(data_dir),
            "cl_tasks": "task0,task1,task2",
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "learning_rate": 1e-3,
            "num_train_epochs": 1,
            "lora_rank": 4,
            "output_dir": str(tmp_path / "run"),
            "seed": 0,
            "disable_tqdm": True,
        }
        values.update(overrides)
        return values

    return make


#: Per-method settings that keep a tiny run tiny (the cross-method matrices use them): generative rehearsal
#: writes a few rows instead of hundreds, EWC's Fisher reads a few rows, peft trains LoRA adapters.
SMALL_METHOD_VALUES = {
    "peft": {"PEFT_type": "LoRA", "lora_rank": None},
    "ewc": {"ewc_num_samples": 8},
    "lamol": {"lamol_num_samples_per_task": 4},
    "pseudo_replay": {"num_samples_per_task": 4},
    "ssr": {"pseudo_sample_memory": 4, "n_clusters": 2, "ssr_num_candidates": 8},
}
