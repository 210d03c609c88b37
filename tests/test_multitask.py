import math

import torch

from retain.cl.registry import parse_config
from retain.model.adapters import adapter_parameters
from retain.training.sequence import Session


def test_multitask_trains_each_task_from_the_initial_adapter_on_all_seen_rows(tiny_config):
    session = Session(parse_config(tiny_config(cl_method="multitask", learning_rate=1e-2)))
    session.load()
    method = session.method
    initial = {k: v.clone() for k, v in adapter_parameters(session.model, "default").items()}
    seen, starts = {}, {}
    original_rows, original_begin = method.training_rows, method.begin_task

    def record_rows(task, rows):
        seen[task.id] = original_rows(task, rows)
        return seen[task.id]

    def record_begin(model, task, data):
        original_begin(model, task, data)
        starts[task.id] = {k: v.detach().clone() for k, v in adapter_parameters(model, "default").items()}

    method.training_rows, method.begin_task = record_rows, record_begin
    for task, data in zip(session.tasks, session.data, strict=True):
        session.train_task(task, data)

    rows = [d.train_rows for d in session.data]
    assert seen[1] == rows[0]
    assert seen[2] == rows[0] + rows[1]
    assert seen[3] == rows[0] + rows[1] + rows[2]
    for task_id in (1, 2, 3):  # every task starts again from the initial weights
        assert all(torch.equal(starts[task_id][k], initial[k]) for k in initial)
    trained = adapter_parameters(session.model, "default")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


def test_multitask_run_end_to_end(tiny_config, tmp_path):
    from retain.api import run

    metrics = run(tiny_config(cl_method="multitask"))
    assert metrics["tasks"] == ["task0", "task1", "task2"]
    assert len(metrics["matrix"]) == 4
    assert all(math.isfinite(v) for row in metrics["matrix"] for v in row)
    assert (tmp_path / "run" / "task_3" / "adapter").is_dir()
