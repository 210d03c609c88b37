"""Two CPU processes through `accelerate launch` give the same science as one."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.distributed_helpers import TORCHRUN, launch, launch_one_and_two, losses, same_on_both_ranks

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun")


#: Run under torchrun (or plain python for one process) in place of `python -m retain run CONFIG`:
#: test-only monkeypatches record, per rank, every file written through `retain.io` and the
#: I-LoRA `ema` adapter after each task. Production code is untouched.
RANK_PROBE = """
import json, os, sys
from pathlib import Path

import retain.io as rio

rank = int(os.environ.get("RANK", "0"))
config, dumps = sys.argv[1], Path(sys.argv[2])
writes = []
write_bytes, make_dir = rio.atomic_write_bytes, rio.atomic_dir


def logged_bytes(path, data):
    writes.append(str(path))
    return write_bytes(path, data)


def logged_dir(path):
    writes.append(str(path))
    return make_dir(path)


import retain.cli
import retain.cl.ilora.ilora as ilora_module
import retain.training.sequence

rio.atomic_write_bytes, rio.atomic_dir = logged_bytes, logged_dir
for module in list(sys.modules.values()):  # names already bound by `from retain.io import ...`
    if getattr(module, "__name__", "").startswith("retain."):
        for name, new in (("atomic_write_bytes", logged_bytes), ("atomic_dir", logged_dir)):
            if getattr(module, name, None) in (write_bytes, make_dir):
                setattr(module, name, new)

from safetensors.torch import save_file
from retain.model.adapters import adapter_parameters

end_task = ilora_module.ILORA.end_task


def end_task_and_dump_ema(self, model, task, data):
    end_task(self, model, task, data)
    ema = adapter_parameters(model, ilora_module.STABLE)
    tensors = {k: v.detach().cpu().contiguous() for k, v in ema.items()}
    save_file(tensors, str(dumps / f"ema_task{task.id}_rank{rank}.safetensors"))


ilora_module.ILORA.end_task = end_task_and_dump_ema
try:
    code = retain.cli.main(["run", config])
finally:
    (dumps / f"writes_rank{rank}.json").write_text(json.dumps(writes))
sys.exit(code)
"""


#: Per-method overrides (None removes a key). `peft` trains one LoRA adapter per task, without
#: dropout here: each process draws its own dropout masks, which would change the losses.
EXACT_METHODS = {
    "seq": {},
    "replay": {"replay_ratio": 0.5},  # the kept shares are drawn by (seed, task): the same on every rank
    "multitask": {},
    "peft": {"PEFT_type": "LoRA", "PEFT_lora_dropout": 0.0, "lora_rank": None, "max_new_tokens": 4},
    # Stacked LoRAs: the penalties depend on the (identical) adapters only, so every rank adds the same.
    "olora": {"max_new_tokens": 4},
    "nlora": {"nlora_lambda": 0.001, "max_new_tokens": 4},
    # InfLoRA: every rank reads the same rows in batches of per_device_eval_batch_size (not the training
    # batch), so the designed A and the subspaces equal one process's; rank 0's are broadcast anyway.
    "inflora": {"max_new_tokens": 4},
    # LwF: the teacher pass runs in eval mode (no dropout), so each rank's KL is deterministic.
    "lwf": {"max_new_tokens": 4},
    # Generative rehearsal: batch k of a sampled generation is drawn with seed + k whatever the process
    # count, and the processes gather every row, so all hold the same pseudo-rows as one process (see
    # also test_lamol_processes_write_the_same_rows). LAMOL's generation loss is a token mean over both
    # processes' generation tokens.
    "lamol": {"lamol_num_samples_per_task": 4, "max_new_tokens": 4},
    "pseudo_replay": {"num_samples_per_task": 4, "max_new_tokens": 4},
    "ssr": {"pseudo_sample_memory": 4, "n_clusters": 2, "max_new_tokens": 4},
}
#: `peft` with a Linear head per task on the tiny Llama's hidden states (pooling 'last'): CIL with the
#: NewLoRA router, TIL without. Heads need two labels per task: the `data_dir` tasks (yes/no, red/blue).
PEFT_HEADS = {
    "PEFT_type": "LoRA",
    "PEFT_lora_dropout": 0.0,
    "lora_rank": None,
    "classifier": "Linear",
    "pooling": "last",
}
EXACT_METHODS["peft-heads-CIL"] = {**PEFT_HEADS, "il_mode": "CIL", "Sub_PEFT_type": "NewLoRA"}
EXACT_METHODS["peft-heads-TIL"] = {**PEFT_HEADS, "il_mode": "TIL", "Sub_PEFT_type": "None"}
#: Choice evaluation: the processes score their share of the length-bounded batches and gather them.
EXACT_METHODS["seq-choice"] = {"eval_mode": "both"}


@pytest.mark.parametrize("method", sorted(EXACT_METHODS))
def test_two_processes_match_one(method, tiny_config, learnable_dir, data_dir, tmp_path):
    if "choice" in method:  # label sets for task0 and task1
        info = json.loads((data_dir / "dataset_info.json").read_text())
        info["task0"]["label_list"], info["task1"]["label_list"] = ["yes", "no"], ["red", "blue"]
        (data_dir / "dataset_info.json").write_text(json.dumps(info))
    base = tiny_config(
        cl_method=method.split("-")[0],
        dataset_dir=str(data_dir if "heads" in method or "choice" in method else learnable_dir),
        cl_tasks="task0,task1",
        logging_steps=1,
        learning_rate=1e-2,
        **EXACT_METHODS[method],
    )
    base = {k: v for k, v in base.items() if v is not None}
    runs = launch_one_and_two(base, tmp_path)
    (one, _, _), (two, _, result) = runs[1], runs[2]
    # The main process alone writes results and prints them.
    assert result.stdout.count("accuracy matrix (%)") == 1
    assert not list(two.rglob(".*.tmp"))
    for task_id in (1, 2):
        expected, got = losses(one, task_id), losses(two, task_id)
        assert len(expected) == len(got) > 0
        # Same rows per optimizer step; only the reduction order differs.
        assert got == pytest.approx(expected, abs=1e-4)
    metrics_one = json.loads((one / "metrics.json").read_text())
    metrics_two = json.loads((two / "metrics.json").read_text())
    assert metrics_two["matrix"] == metrics_one["matrix"]
    assert metrics_two.get("extra_matrices") == metrics_one.get("extra_matrices")
    if "choice" in method:
        assert metrics_one["extra_matrices"]["choice_accuracy"][2][0] is not None
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_ilora_two_processes_match_one(tiny_config, learnable_dir, tmp_path):
    """A 2-task I-LoRA run: 2 processes x batch 2 against 1 process x batch 4 (replay rows: 2 x 2 vs 4).

    Tolerance: the first optimizer step replays nothing (the buffer is empty), so its loss agrees to
    1e-4, as for `seq`. From the second step on, each process replays rows from its own reservoir
    buffer (its own shard of the data, its own seed), so the replayed rows can differ from the
    single-process run's, and the buffer terms are per-process token means that DDP averages
    (exact only when both processes replay equally many tokens). The per-step losses then agree
    to 0.02 absolute (0.4% of a loss near 5; the largest difference seen here is 0.003). The EMA
    adapters must be bit-identical on both ranks: both apply the same all-reduced
    gradient and the same EMA formula.
    """
    base = tiny_config(
        cl_method="ilora",
        dataset_dir=str(learnable_dir),
        cl_tasks="task0,task1",
        logging_steps=1,
        learning_rate=1e-2,
        ilora_buffer_size=8,
        max_new_tokens=4,
    )
    runs = launch_one_and_two(base, tmp_path, RANK_PROBE)
    (one, _, _), (two, dumps, result) = runs[1], runs[2]
    # Outputs are written once, by the main process: rank 1 writes nothing through retain.io.
    assert result.stdout.count("accuracy matrix (%)") == 1
    assert json.loads((dumps / "writes_rank1.json").read_text()) == []
    written = [Path(p) for p in json.loads((dumps / "writes_rank0.json").read_text())]
    written = {p.relative_to(two).as_posix() for p in written if p.is_relative_to(two)}
    assert {"metrics.json", "state.json", "ilora_task1", "ilora_task2"} <= written
    assert not list(two.rglob(".*.tmp"))
    metrics = json.loads((two / "metrics.json").read_text())
    assert all(v is not None for row in metrics["matrix"][1:] for v in row)
    # The EMA adapters are identical on both ranks after every task.
    for task_id in (1, 2):
        rank0 = same_on_both_ranks(dumps, f"ema_task{task_id}")
    # What rank 0 holds is what the task directory saves.
    saved = load_file(str(two / "ilora_task2" / "ema" / "adapter_model.safetensors"))
    assert saved.keys() == rank0.keys()
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)
    for task_id in (1, 2):
        expected, got = losses(one, task_id), losses(two, task_id)
        assert len(expected) == len(got) > 1
        if task_id == 1:  # no replay yet: the same rows, only the reduction order differs
            assert got[0] == pytest.approx(expected[0], abs=1e-4)
        assert got == pytest.approx(expected, abs=0.02)
    shutil.rmtree(tmp_path, ignore_errors=True)


#: Like RANK_PROBE, for EWC: after each task every rank dumps its running Fisher and theta*.
EWC_PROBE = """
import os, sys
from pathlib import Path

import retain.cl.ewc.method as ewc_module
import retain.cli
from safetensors.torch import save_file

rank = int(os.environ.get("RANK", "0"))
config, dumps = sys.argv[1], Path(sys.argv[2])
end_task = ewc_module.EWC.end_task


def end_task_and_dump(self, model, task, data):
    end_task(self, model, task, data)
    tensors = {f"fisher/{k}": f.cpu() for k, f in zip(self.keys, self.fisher)}
    tensors.update({f"anchor/{k}": a.cpu() for k, a in zip(self.keys, self.anchor)})
    save_file(tensors, str(dumps / f"ewc_task{task.id}_rank{rank}.safetensors"))


ewc_module.EWC.end_task = end_task_and_dump
sys.exit(retain.cli.main(["run", config]))
"""


def test_ewc_two_processes_match_one_and_hold_the_same_fisher(tiny_config, learnable_dir, tmp_path):
    """A 2-task EWC run: 2 processes x batch 2 against 1 process x batch 4, the same global batch.

    Every rank computes the Fisher on the same rows with the same (all-reduced) weights, so the
    ranks hold bit-identical state; the penalty is the same on every rank and enters the loss once.
    """
    base = tiny_config(
        cl_method="ewc",
        dataset_dir=str(learnable_dir),
        cl_tasks="task0,task1",
        logging_steps=1,
        learning_rate=1e-2,
        ewc_num_samples=8,
        max_new_tokens=4,
    )
    runs = launch_one_and_two(base, tmp_path, EWC_PROBE)
    (one, dumps_one, _), (two, dumps, _) = runs[1], runs[2]
    for task_id in (1, 2):
        rank0 = same_on_both_ranks(dumps, f"ewc_task{task_id}")
        saved = load_file(str(two / f"task_{task_id}" / "ewc_state.safetensors"))
        assert saved.keys() == rank0.keys() and all(torch.equal(saved[k], rank0[k]) for k in rank0)
        single = load_file(str(dumps_one / f"ewc_task{task_id}_rank0.safetensors"))
        for k in single:  # the same weights up to the reduction order
            torch.testing.assert_close(rank0[k], single[k], atol=1e-7, rtol=1e-3)
        expected, got = losses(one, task_id), losses(two, task_id)
        assert len(expected) == len(got) > 1
        assert got == pytest.approx(expected, abs=1e-4)
    # The penalty is logged once per step, averaged over ranks like `loss`.
    history = json.loads((two / "logs" / "train_task_2.json").read_text())
    entries = [e for e in history if "loss" in e]
    assert all(e["loss_ewc"] > 0 for e in entries[1:])
    assert all(e["loss"] == pytest.approx(e["loss_ce"] + e["loss_ewc"], rel=1e-5) for e in entries)
    matrix_one = json.loads((one / "metrics.json").read_text())["matrix"]
    assert json.loads((two / "metrics.json").read_text())["matrix"] == matrix_one
    shutil.rmtree(tmp_path, ignore_errors=True)


#: Like RANK_PROBE, for GEM and A-GEM: after each task every rank dumps its adapter and its memories.
PROJECTION_PROBE = """
import os, sys
from pathlib import Path

import retain.cl.projection.method as projection_module
import retain.cli
from retain.model.adapters import adapter_parameters
from safetensors.torch import save_file

rank = int(os.environ.get("RANK", "0"))
config, dumps = sys.argv[1], Path(sys.argv[2])
end_task = projection_module.GradientProjection.end_task


def end_task_and_dump(self, model, task, data):
    end_task(self, model, task, data)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_parameters(model, "default").items()}
    save_file(tensors, str(dumps / f"adapter_task{task.id}_rank{rank}.safetensors"))
    self.memory.save(dumps / f"memory_task{task.id}_rank{rank}.safetensors")


projection_module.GradientProjection.end_task = end_task_and_dump
sys.exit(retain.cli.main(["run", config]))
"""


@pytest.mark.parametrize("method", ["gem", "agem"])
def test_projection_two_processes_match_one_and_stay_identical(method, tiny_config, learnable_dir, tmp_path):
    """A 2-task GEM / A-GEM run: 2 processes x batch 2 against 1 process x batch 4, the same global batch.

    The reference batch (by default the step's global batch, 4 rows) is split over the processes and its
    gradient all-reduced, so every rank projects the same all-reduced gradient against the same reference
    gradients: the adapters stay bit-identical across ranks, and the run matches one process up to the
    reduction order (losses to 1e-4, as for `seq`).
    """
    base = tiny_config(
        cl_method=method,
        dataset_dir=str(learnable_dir),
        cl_tasks="task0,task1",
        logging_steps=1,
        learning_rate=1e-2,
        num_train_epochs=2,
        max_new_tokens=4,
    )
    runs = launch_one_and_two(base, tmp_path, PROJECTION_PROBE)
    (one, dumps_one, _), (two, dumps, _) = runs[1], runs[2]
    for task_id in (1, 2):
        same_on_both_ranks(dumps, f"adapter_task{task_id}")
        memories = [(dumps / f"memory_task{task_id}_rank{r}.safetensors").read_bytes() for r in (0, 1)]
        single = (dumps_one / f"memory_task{task_id}_rank0.safetensors").read_bytes()
        assert memories[0] == memories[1] == single
        expected, got = losses(one, task_id), losses(two, task_id)
        assert len(expected) == len(got) > 1
        assert got == pytest.approx(expected, abs=1e-4)
    key = f"{method}_projected"
    history = [e for e in json.loads((two / "logs" / "train_task_2.json").read_text()) if "loss" in e]
    single = [e for e in json.loads((one / "logs" / "train_task_2.json").read_text()) if "loss" in e]
    assert sum(e[key] for e in history) > 0, "some step of task 2 must be projected"
    assert [e[key] for e in history] == [e[key] for e in single]
    matrix_one = json.loads((one / "metrics.json").read_text())["matrix"]
    assert json.loads((two / "metrics.json").read_text())["matrix"] == matrix_one
    shutil.rmtree(tmp_path, ignore_errors=True)


#: Like RANK_PROBE, for LAMOL: every rank dumps the rows it trains with next to each task.
LAMOL_PROBE = """
import json, os, sys
from pathlib import Path

import torch

import retain.cl.lamol.method as lamol_module
import retain.cli

torch.set_default_dtype(torch.float64)  # the tiny model, built in code, and its LoRA weights
rank = int(os.environ.get("RANK", "0"))
config, dumps = sys.argv[1], Path(sys.argv[2])
begin_task = lamol_module.LAMOL.begin_task


def begin_task_and_dump(self, model, task, data):
    begin_task(self, model, task, data)
    (dumps / f"rows_task{task.id}_rank{rank}.json").write_text(json.dumps(self.current))


lamol_module.LAMOL.begin_task = begin_task_and_dump
sys.exit(retain.cli.main(["run", config]))
"""


def test_lamol_processes_write_the_same_rows(tiny_config, learnable_dir, tmp_path):
    """A 2-task LAMOL run trained long enough (16 epochs, gamma 1) to write well-formed rows of task 0 before
    task 1: 2 processes x batch 2 against 1 process x batch 4.

    Every rank holds the rows the single process writes (seeded batches, gathered). Both set-ups train in
    float64: in float32, 64 optimizer steps at learning rate 1e-2 grow the reduction-order differences
    between one process and two (gradients averaged in another order) to 2e-3 relative on some CPUs,
    which would test the CPU rather than LAMOL. In float64 (the token losses are still taken in float32,
    `cl/loss.py`) they stay near 2e-7 relative throughout, so task 0's losses must agree to 1e-5 relative
    (1e-4 absolute at these losses, as in `EXACT_METHODS`) and the sampled rows (temperature 0.05) do not
    move by chance. Task 1 trains 16 rows plus the written ones: a count that is not a multiple of the
    global batch, for which the distributed sampler composes the steps differently from one process (an
    engine property, not LAMOL's), so only its step count and the matrix are compared.
    """
    base = tiny_config(
        cl_method="lamol",
        dataset_dir=str(learnable_dir),
        cl_tasks="task0,task1",
        logging_steps=1,
        learning_rate=1e-2,
        num_train_epochs=16,
        lamol_gamma=1.0,
        lamol_num_samples_per_task=8,
        lamol_generation_temperature=0.05,
        max_new_tokens=4,
        eval_base=False,
    )
    runs = launch_one_and_two(base, tmp_path, LAMOL_PROBE)
    (one, dumps_one, _), (two, dumps, _) = runs[1], runs[2]
    single = json.loads((dumps_one / "rows_task2_rank0.json").read_text())
    assert single and all(row["task"] == "task0" for row in single), "the check needs written rows"
    for rank in (0, 1):
        assert json.loads((dumps / f"rows_task2_rank{rank}.json").read_text()) == single
    assert json.loads((two / "pseudo" / "task1.json").read_text()) == single
    expected, got = losses(one, 1), losses(two, 1)
    assert len(expected) == len(got) > 1
    assert got == pytest.approx(expected, rel=1e-5)
    assert len(losses(one, 2)) == len(losses(two, 2))
    matrix_one = json.loads((one / "metrics.json").read_text())["matrix"]
    assert json.loads((two / "metrics.json").read_text())["matrix"] == matrix_one
    shutil.rmtree(tmp_path, ignore_errors=True)


#: After each InfLoRA task every rank dumps its stored subspaces and the task's designed A.
INFLORA_PROBE = """
import os, sys
from pathlib import Path

import retain.cl.inflora.method as inflora_module
import retain.cli
from safetensors.torch import save_file

rank = int(os.environ.get("RANK", "0"))
config, dumps = sys.argv[1], Path(sys.argv[2])
end_task = inflora_module.InfLoRA.end_task


def end_task_and_dump(self, model, task, data):
    end_task(self, model, task, data)
    tensors = {f"basis/{n}": b.cpu().contiguous() for n, b in zip(self.names, self.bases)}
    name = f"task-{task.id}"
    tensors.update({f"a/{n}": l.lora_A[name].weight.detach().cpu() for n, l in zip(self.names, self.layers)})
    save_file(tensors, str(dumps / f"inflora_task{task.id}_rank{rank}.safetensors"))


inflora_module.InfLoRA.end_task = end_task_and_dump
sys.exit(retain.cli.main(["run", config]))
"""


def test_inflora_ranks_hold_the_same_subspaces_and_loras(tiny_config, learnable_dir, tmp_path):
    """Two processes: after each task both ranks hold bit-identical subspaces and designed A, and rank 0's
    are what the task directory saves (test_two_processes_match_one compares the run with one process)."""
    base = tiny_config(
        cl_method="inflora",
        dataset_dir=str(learnable_dir),
        cl_tasks="task0,task1",
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_new_tokens=4,
        output_dir=str(tmp_path / "p2"),
    )
    script, dumps, config = tmp_path / "inflora_probe.py", tmp_path / "dumps", tmp_path / "p2.yaml"
    script.write_text(INFLORA_PROBE)
    dumps.mkdir()
    config.write_text(yaml.safe_dump(base))
    result = launch(config, 2, script, str(dumps))
    assert result.returncode == 0, result.stderr[-3000:]
    for task_id in (1, 2):
        rank0 = same_on_both_ranks(dumps, f"inflora_task{task_id}")
        assert any(v.shape[1] > 0 for k, v in rank0.items() if k.startswith("basis/"))
        saved = load_file(str(tmp_path / "p2" / f"task_{task_id}" / "inflora_state.safetensors"))
        assert all(torch.equal(saved[k], rank0[k]) for k in saved) and len(saved) == len(rank0) // 2
    shutil.rmtree(tmp_path, ignore_errors=True)
