"""Launching a config or a probe script on CPU processes (torchrun, gloo), and reading a run's losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    """A port nobody listens on now: parallel test runs must not share the rendezvous port."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(
    config: Path, processes: int, script: Path | None = None, *args: str
) -> subprocess.CompletedProcess:
    # On CPUs, torchrun starts the processes (accelerate's --cpu launcher needs MPI); the
    # Trainer then runs DDP over gloo, exactly as under `accelerate launch` on GPUs.
    target = [str(script)] if script else ["-m", "retain", "run"]
    if processes > 1:
        command = [str(TORCHRUN), "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    else:
        command = [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, *target, str(config), *args], capture_output=True, text=True, timeout=600, env=env
    )


def losses(run_dir: Path, task_id: int) -> list[float]:
    history = json.loads((run_dir / "logs" / f"train_task_{task_id}.json").read_text())
    return [entry["loss"] for entry in history if "loss" in entry]
