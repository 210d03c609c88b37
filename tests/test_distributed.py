"""Two CPU processes through `accelerate launch` give the same science as one."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun")


def launch(config: Path, processes: int) -> subprocess.CompletedProcess:
    # On CPUs, torchrun starts the processes (accelerate's --cpu launcher needs MPI); the
    # Trainer then runs DDP over gloo, exactly as under `accelerate launch` on GPUs.
    command = [
        str(TORCHRUN),
        "--nproc_per_node",
        str(processes),
        "--master_port",
        "29533",
        "-m",
        "retain",
        "run",
        str(config),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def losses(run_dir: Path, task_id: int) -> list[float]:
    history = json.loads((run_dir / "logs" / f"train_task_{task_id}.json").read_text())
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.parametrize("method", ["seq"])
def test_two_processes_match_one(method, tiny_config, learnable_dir, tmp_path):
    base = tiny_config(
        cl_method=method,
        dataset_dir=str(learnable_dir),
        cl_tasks="task0,task1",
        logging_steps=1,
        learning_rate=1e-2,
    )
    runs = {}
    for processes, batch in ((1, 4), (2, 2)):  # the same global batch of 4 rows
        out = tmp_path / f"p{processes}"
        config = tmp_path / f"p{processes}.yaml"
        config.write_text(
            yaml.safe_dump({**base, "per_device_train_batch_size": batch, "output_dir": str(out)})
        )
        result = (
            launch(config, processes)
            if processes > 1
            else subprocess.run(
                [sys.executable, "-m", "retain", "run", str(config)],
                capture_output=True,
                text=True,
                timeout=600,
            )
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = (out, result)

    (one, _), (two, result) = runs[1], runs[2]
    # The main process alone writes results and prints them.
    assert result.stdout.count("accuracy matrix (%)") == 1
    assert not list(two.rglob(".*.tmp"))
    for task_id in (1, 2):
        expected, got = losses(one, task_id), losses(two, task_id)
        assert len(expected) == len(got) > 0
        # Same rows per optimizer step; only the reduction order differs.
        assert got == pytest.approx(expected, abs=1e-4)
    matrix_one = json.loads((one / "metrics.json").read_text())["matrix"]
    matrix_two = json.loads((two / "metrics.json").read_text())["matrix"]
    assert matrix_two == matrix_one
    shutil.rmtree(tmp_path, ignore_errors=True)
