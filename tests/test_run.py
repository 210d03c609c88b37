import csv
import json
import subprocess
import sys

import pytest
import torch
import yaml

import retain
from retain.training.sequence import STATE_FILE


def test_three_task_run_writes_every_output(tiny_config, tmp_path):
    metrics = retain.run(tiny_config())
    out = tmp_path / "run"
    tasks = ["task0", "task1", "task2"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["tasks"] == tasks == metrics["tasks"]
    for key in ("matrix", "last", "avg", "bwt", "fwt", "forgetting"):
        assert key in saved
    matrix = saved["matrix"]
    assert len(matrix) == 4 and all(len(row) == 3 for row in matrix)
    for key in ("last", "avg", "bwt", "fwt", "forgetting"):
        assert isinstance(saved[key], float)
    rows = list(csv.reader((out / "accuracy_matrix.csv").open()))
    assert rows[0] == ["after", *tasks] and [r[0] for r in rows[1:]] == ["base", *tasks]
    assert [float(x) for x in rows[2][1:]] == [round(v, 6) for v in matrix[1]]
    for name in ("accuracy_matrix.png", "accuracy_curve.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "accuracy_matrix.png" in report and "| after task0 |" in report
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["cl_tasks"] == tasks and config["cl_method"] == "seq" and config["lora_rank"] == 4
    for k in (1, 2, 3):
        assert (out / f"task_{k}" / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / f"task_{k}" / "adapter" / "adapter_config.json").is_file()
        assert (out / "predictions" / f"after_{k}" / "task0.jsonl").is_file()
    state = json.loads((out / STATE_FILE).read_text())
    assert state["finished"] and sorted(state["trained"]) == ["1", "2", "3"]
    assert not list(out.glob(".*tmp")), "no temporary files left behind"

    # `retain report` rebuilds the report from metrics.json alone.
    (out / "report.md").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "retain", "report", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (out / "report.md").is_file() and "last=" in result.stdout


def test_train_then_eval_equals_run(tiny_config, tmp_path):
    run_metrics = retain.run(tiny_config(output_dir=str(tmp_path / "a")))
    retain.train(tiny_config(output_dir=str(tmp_path / "b")))
    assert not (tmp_path / "b" / "metrics.json").exists()
    eval_metrics = retain.evaluate(tiny_config(output_dir=str(tmp_path / "b")))
    assert eval_metrics["matrix"] == run_metrics["matrix"]


def test_eval_scope_seen_skips_unseen_tasks(tiny_config):
    metrics = retain.run(tiny_config(eval_scope="seen"))
    matrix = metrics["matrix"]
    assert matrix[1][2] is None  # after task 1, task 3 is neither seen nor next
    assert matrix[1][1] is not None  # the next task is evaluated, for FWT
    assert all(v is not None for v in matrix[0] + matrix[3])
    assert metrics["fwt"] is not None and metrics["bwt"] is not None


def test_logged_steps_increase_over_the_whole_sequence(tiny_config, tmp_path):
    """report_to: tensorboard writes one run's events whose steps continue from task to task."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    retain.run(tiny_config(report_to="tensorboard", logging_steps=1, max_samples=8))
    out = tmp_path / "run"
    per_task = [json.loads((out / "logs" / f"train_task_{k}.json").read_text()) for k in (1, 2, 3)]
    steps = [[e["step"] for e in history if "loss" in e] for history in per_task]
    assert steps[0] == [1, 2] and steps[1] == [3, 4] and steps[2] == [5, 6]  # 8 rows / batch 4, per task
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = sorted(event.step for event in events.Scalars("train/loss"))
    assert logged == [1, 2, 3, 4, 5, 6]


def test_generation_stops_at_every_end_token_of_the_generation_config(tiny_config):
    from retain.cl.registry import parse_config
    from retain.eval.predict import generate_answers, stop_token_ids
    from retain.training.sequence import Session

    session = Session(parse_config(tiny_config(cl_tasks="task0")))
    session.load()
    model, tokenizer = session.model, session.tokenizer
    prompt = torch.tensor([session.builder.prompt_ids(session.data[0].test[0])])
    free = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[0, prompt.size(1) :].tolist()
    assert len(free) == 6 and tokenizer.eos_token_id not in free, "the probe needs 6 tokens without EOS"
    first = free[0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]  # an end-of-turn token
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, first]
    answers = generate_answers(model, tokenizer, [prompt[0].tolist()], 1, 6)
    assert answers == [tokenizer.decode([first], skip_special_tokens=True)]


def test_a_run_leaves_the_callers_config_as_it_was(tiny_config, tmp_path):
    import copy

    from retain.cl.registry import parse_config

    config = parse_config(tiny_config(cl_tasks="task0,task1", learning_rate=1e-2))
    before = copy.deepcopy(config.resolved())
    metrics = retain.run(config)
    assert config.resolved() == before and config.cl.previous_task_model is None
    assert config.training.output_dir == str(tmp_path / "run")
    again = retain.evaluate(config)  # the same object again: the same run, nothing retrained
    assert again["matrix"] == metrics["matrix"]
    state = json.loads((tmp_path / "run" / STATE_FILE).read_text())
    assert sorted(state["trained"]) == ["1", "2"] and not (tmp_path / "run" / "from_task3").exists()


def test_a_methods_loss_terms_reach_the_log_and_tensorboard(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    retain.run(
        tiny_config(
            cl_method="lwf", cl_tasks="task0,task1", report_to="tensorboard", logging_steps=1, max_samples=8
        )
    )
    out = tmp_path / "run"
    history = [e for e in json.loads((out / "logs" / "train_task_2.json").read_text()) if "loss" in e]
    assert history and all(e["loss"] == pytest.approx(e["loss_ce"] + e["loss_kl"], rel=1e-5) for e in history)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss_ce", "train/loss_kl"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss_kl")] == [1, 2, 3, 4]
