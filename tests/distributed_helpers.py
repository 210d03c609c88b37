"""Launching a config or a probe script on CPU processes (torchrun, gloo), and reading a run's losses."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.run_helpers import log_entries

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
    return [entry["loss"] for entry in log_entries(run_dir, task_id)]


def launch_one_and_two(base: dict, tmp_path: Path, probe: str | None = None) -> dict:
    """Run config `base` on 1 process x batch 4 and on 2 processes x batch 2: the same global batch of 4 rows.

    `probe` (a script's text) runs in place of `python -m retain run`, given a folder to dump into.
    Returns {processes: (output_dir, dumps folder, result)}.
    """
    script = None
    if probe is not None:
        script = tmp_path / "probe.py"
        script.write_text(probe)
    runs = {}
    for processes, batch in ((1, 4), (2, 2)):
        out, folder = tmp_path / f"p{processes}", tmp_path / f"dumps{processes}"
        config = tmp_path / f"p{processes}.yaml"
        config.write_text(
            yaml.safe_dump({**base, "per_device_train_batch_size": batch, "output_dir": str(out)})
        )
        args = []
        if probe is not None:
            folder.mkdir()
            args = [str(folder)]
        result = launch(config, processes, script, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = (out, folder, result)
    return runs


def same_on_both_ranks(dumps: Path, stem: str) -> dict[str, torch.Tensor]:
    """Rank 0's dump `{stem}_rank0.safetensors`, once rank 1's is found to hold bit-identical tensors."""
    rank0 = load_file(str(dumps / f"{stem}_rank0.safetensors"))
    rank1 = load_file(str(dumps / f"{stem}_rank1.safetensors"))
    assert rank0 and rank0.keys() == rank1.keys(), f"{stem}: the ranks dumped different tensors"
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), f"{stem}: the ranks drifted apart"
    return rank0
