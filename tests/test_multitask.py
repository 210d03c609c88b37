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


def test_the_last_row_is_the_model_trained_jointly_on_every_task(tiny_config, data_dir, tmp_path):
    """End to end: multitask's final task state equals seq trained once, from the same initial adapter and
    seed, on the union of every task's train rows (in task order) - the multi-task model."""
    import json

    from safetensors.torch import load_file

    from retain.api import run

    info = json.loads((data_dir / "dataset_info.json").read_text())
    union = [
        row for t in ("task0", "task1", "task2") for row in json.loads((data_dir / f"{t}.json").read_text())
    ]
    (data_dir / "union.json").write_text(json.dumps(union))
    info["union"] = {**info["task0"], "file_name": "union.json"}
    info["union_test"] = info["task0_test"]
    (data_dir / "dataset_info.json").write_text(json.dumps(info))

    multitask = run(tiny_config(cl_method="multitask", learning_rate=1e-2))
    run(tiny_config(cl_tasks="union", learning_rate=1e-2, output_dir=str(tmp_path / "union")))
    joint = load_file(str(tmp_path / "run" / "task_3" / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "union" / "task_1" / "adapter" / "adapter_model.safetensors"))
    assert joint.keys() == reference.keys() and joint
    for key in joint:
        torch.testing.assert_close(joint[key], reference[key], atol=1e-6, rtol=0)
    first = load_file(str(tmp_path / "run" / "task_1" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(first[k], joint[k]) for k in joint)  # row 1 is a different (one-task) model
    assert len(multitask["matrix"]) == 4
