"""Kill a run with SIGKILL during task 2, resume it, and compare with an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from retain.cl.registry import load_method as get_method
from retain.cl.registry import parse_config
from retain.training.sequence import STATE_FILE, Session
from retain.training.trainer import last_complete_checkpoint
from tests.run_helpers import KILL_DURING_TASK_2

# Per-method overrides of the shared config (None removes a key). I-LoRA's mid-task state (the EMA
# adapter, the replay buffer, the EMA step counter) and the per-task adapters of `peft` must survive
# the kill through the methods' checkpoint hooks.
METHODS = {
    "seq": {},
    "multitask": {"cl_method": "multitask"},
    "replay": {"cl_method": "replay", "replay_ratio": 0.5},
    "ilora": {
        "cl_method": "ilora",
        "ilora_buffer_size": 6,
        "ilora_replay_batch_size": 2,
        "max_new_tokens": 4,
    },
    "peft": {"cl_method": "peft", "PEFT_type": "LoRA", "lora_rank": None, "max_new_tokens": 4},
    # EWC's Fisher and theta* come back with task 1's state; LwF's teacher is re-copied at begin_task.
    "ewc": {"cl_method": "ewc", "ewc_num_samples": 8, "max_new_tokens": 4},
    "lwf": {"cl_method": "lwf", "max_new_tokens": 4},
    # Stacked LoRAs: the Trainer's checkpoint reloads every adapter and leaves the current one alone
    # active; the stack must be active again. nlora's default weight keeps the tiny model from learning.
    "olora": {"cl_method": "olora", "max_new_tokens": 4},
    "nlora": {"cl_method": "nlora", "nlora_lambda": 0.001, "max_new_tokens": 4},
    # InfLoRA: begin_task designs the same A again (same rows, deterministic), and the Trainer's resume
    # (peft's set_adapter) must leave A frozen, so the optimizer it rebuilds holds task 2's B alone.
    "inflora": {"cl_method": "inflora", "max_new_tokens": 4},
    # GEM / A-GEM: the memories come back with task 1's state; each step's reference rows are drawn by a
    # generator seeded with (seed, task, step), so the resumed steps project against the same rows.
    "gem": {"cl_method": "gem", "max_new_tokens": 4},
    "agem": {"cl_method": "agem", "agem_memory_size": 6, "max_new_tokens": 4},
    # Generative rehearsal: LAMOL writes task 2's rows before task 2 (pseudo/task1.json), and the resumed
    # run reuses that file; pseudo_replay and ssr restore the rows of task 1 with task 1's state.
    "lamol": {"cl_method": "lamol", "lamol_num_samples_per_task": 4, "max_new_tokens": 4},
    "pseudo_replay": {"cl_method": "pseudo_replay", "num_samples_per_task": 4, "max_new_tokens": 4},
    "ssr": {"cl_method": "ssr", "pseudo_sample_memory": 4, "n_clusters": 2, "max_new_tokens": 4},
}


class StepLog(TrainerCallback):
    def __init__(self, steps):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def adapter_tensors(run_dir, method, task_id):
    """Every tensor of the state saved after task `task_id` (adapters, buffers), by file and key."""
    pattern = get_method(method).task_dir_pattern.format(id=task_id, index=task_id - 1)
    files = sorted((run_dir / pattern).glob("**/*.safetensors"))
    assert files, f"no saved state for task {task_id} in {run_dir / pattern}"
    return {f"{f.relative_to(run_dir)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_during_task_2_then_resume_matches_uninterrupted(
    method, tiny_config, learnable_dir, tmp_path
):
    values = tiny_config(
        **METHODS[method],
        dataset_dir=str(learnable_dir),
        save_steps=1,
        learning_rate=1e-2,
        num_train_epochs=2,
    )
    values = {k: v for k, v in values.items() if v is not None}
    name = values.get("cl_method", "seq")
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({**values, "output_dir": str(killed_dir)}))
    # One intra-op thread, like the in-process runs (conftest): spin-waiting threads make a tiny
    # model many times slower on a busy 2-core machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", KILL_DURING_TASK_2, str(config_file)], capture_output=True, text=True, env=env
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    state = json.loads((killed_dir / STATE_FILE).read_text())
    assert list(state["trained"]) == ["1"] and not state["finished"]
    assert all(v is not None for v in state["matrix"][1]) and state["matrix"][2] == [None, None, None]
    assert list((killed_dir / "checkpoints" / "task_2").glob("checkpoint-1"))
    task1_before = adapter_tensors(killed_dir, name, 1)

    resumed = Session(parse_config({**values, "output_dir": str(killed_dir)}))
    trained, steps = [], []
    original = resumed.train_task
    resumed.train_task = lambda task, data: (trained.append(task.id), original(task, data))[1]
    callbacks = resumed.method.callbacks
    resumed.method.callbacks = lambda model: [*callbacks(model), StepLog(steps)]
    resumed_metrics = resumed.run()
    assert trained == [2, 3], "task 1 must not be retrained"
    assert steps[0] == 2, "task 2 goes on after its last checkpoint (step 1), not from its start"
    for key, value in adapter_tensors(killed_dir, name, 1).items():
        assert torch.equal(value, task1_before[key])

    clean_metrics = Session(parse_config({**values, "output_dir": str(clean_dir)})).run()
    flat = [v for row in resumed_metrics["matrix"] for v in row]
    assert flat == pytest.approx([v for row in clean_metrics["matrix"] for v in row], abs=1e-6)
    assert max(flat) > 0, "the tasks must be learned, or the comparison says little"
    clean_final, resumed_final = adapter_tensors(clean_dir, name, 3), adapter_tensors(killed_dir, name, 3)
    assert clean_final.keys() == resumed_final.keys()
    for key in clean_final:
        torch.testing.assert_close(resumed_final[key], clean_final[key], atol=1e-6, rtol=0)
    assert not (killed_dir / "checkpoints" / "task_2").exists(), "a finished task's checkpoints are removed"


def test_resume_skips_a_checkpoint_cut_short_by_a_kill(tmp_path):
    for step, complete in ((1, True), (2, True), (3, False), (10, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:  # the Trainer writes trainer_state.json last
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert last_complete_checkpoint(tmp_path / "missing") is None
