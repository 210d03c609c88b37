"""End-to-end `peft` runs on tiny models: generative LoRA and prompt tuning, sentence heads (CIL/TIL), word level."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from retain.api import evaluate, run, train
from retain.cl.pertask.adapters import HEAD_CONFIG, HEAD_FILE, ROUTER_FILE
from retain.cl.pertask.method import STATE_FILE
from retain.cl.registry import parse_config
from retain.training.sequence import Session
from tests.conftest import write_task_family
from tests.pertask_helpers import build_tiny_bert, one_torch_thread, peft_values  # noqa: F401
from tests.run_helpers import KILL_DURING_TASK_2

pytestmark = pytest.mark.slow


def saved(directory, name="adapter_model.safetensors"):
    return load_file(str(directory / name))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_lora_generative_til_run_leaves_task_0_bit_identical(tmp_path, data_dir):
    session = Session(parse_config(peft_values(tmp_path, data_dir, PEFT_type="LoRA", il_mode="TIL")))
    metrics = session.run()
    out = tmp_path / "run"
    # The seed's layout: lora_task_{t} holds every adapter trained so far, one task-{i} folder each.
    assert sorted(p.name for p in (out / "lora_task_0").iterdir() if p.is_dir()) == ["task-0"]
    assert sorted(p.name for p in (out / "lora_task_1").iterdir() if p.is_dir()) == ["task-0", "task-1"]
    for folder in ("lora_task_0/task-0", "lora_task_1/task-0", "lora_task_1/task-1"):
        assert (out / folder / "adapter_config.json").is_file()
    after_0 = saved(out / "lora_task_0" / "task-0")
    assert_same_tensors(saved(out / "lora_task_1" / "task-0"), after_0)
    in_memory = get_peft_model_state_dict(session.method.peft, adapter_name="task-0")
    assert_same_tensors({k: v.detach() for k, v in in_memory.items()}, after_0)
    # Task 1 was trained: its LoRA B matrices (zero at creation) moved.
    task_1 = saved(out / "lora_task_1" / "task-1")
    assert any(v.abs().sum() > 0 for k, v in task_1.items() if "lora_B" in k)
    # TIL: every task is answered by its own adapter, so nothing is forgotten, exactly.
    assert metrics["bwt"] == 0.0
    assert metrics["matrix"][1][0] == metrics["matrix"][2][0]
    assert json.loads((out / "lora_task_1" / STATE_FILE).read_text())["adapters"] == ["task-0", "task-1"]


def test_prompt_tuning_generative_run(tmp_path, data_dir):
    session = Session(parse_config(peft_values(tmp_path, data_dir, PEFT_num_virtual_tokens=4)))
    metrics = session.run()
    out = tmp_path / "run"
    prompt_0 = saved(out / "lora_task_0" / "task-0")
    assert list(prompt_0) == ["prompt_embeddings"] and prompt_0["prompt_embeddings"].shape == (4, 64)
    assert_same_tensors(saved(out / "lora_task_1" / "task-0"), prompt_0)
    peft = session.method.peft
    assert torch.equal(peft.prompt_encoder["task-0"].embedding.weight.detach(), prompt_0["prompt_embeddings"])
    # Task 1's prompt started from its instruction's embeddings and was trained away from them.
    text = "Task 1: answer red or blue."
    ids = session.tokenizer(text, add_special_tokens=False)["input_ids"][:4]
    init = peft.word_embeddings(torch.tensor(ids)).detach()
    trained = saved(out / "lora_task_1" / "task-1")["prompt_embeddings"]
    assert not torch.equal(trained, init) and (trained - init).abs().max() < 1.0
    assert all(0.0 <= v <= 1.0 for row in metrics["matrix"] for v in row)
    # Generative CIL answers with the current adapter (seed 7.2), TIL with the evaluated task's.
    method, model, tasks = session.method, session.model, session.tasks
    with method.evaluation(model, tasks[1], tasks[0]):
        assert peft.active_adapter == "task-1"
    method.args.il_mode = "TIL"
    with method.evaluation(model, tasks[1], tasks[0]):
        assert peft.active_adapter == "task-0"
    assert peft.active_adapter == "task-1"


def keyword_tasks(rows: int = 16) -> dict:
    """Two tasks whose label is given away by a keyword: learnable by a head on a tiny random encoder."""
    words = [("good", "bad", "yes", "no"), ("warm", "cold", "red", "blue")]
    return {
        f"task{t}": (
            f"Task {t}.",
            [(f"sample {i} {a if i % 2 else b}", x if i % 2 else y) for i in range(rows)],
        )
        for t, (a, b, x, y) in enumerate(words)
    }


def test_sentence_heads_on_an_encoder_learn_and_evaluate_til_and_cil(tmp_path):
    bert = build_tiny_bert(tmp_path / "bert")
    values = peft_values(
        tmp_path,
        write_task_family(tmp_path / "data", keyword_tasks()),
        model_name_or_path=str(bert),
        PEFT_type="LoRA",
        classifier="CosineLinear",
        il_mode="TIL",
        num_train_epochs=15,
        learning_rate=3e-2,
        max_samples=None,
        eval_max_samples=None,
        output_dir=str(tmp_path / "til"),
    )
    train(values)
    til_dir = tmp_path / "til"
    for name in ("cil", "hard"):
        shutil.copytree(til_dir, tmp_path / name)
    til = evaluate(values)
    cil = evaluate({**values, "il_mode": "CIL", "output_dir": str(tmp_path / "cil")}, force=True)
    hard = evaluate(
        {**values, "il_mode": "CIL", "newlora_routing": "hard", "output_dir": str(tmp_path / "hard")},
        force=True,
    )
    # Isolation: task 0's adapter, head and (after task 0 only one task is seen) scores are untouched.
    for file in ("adapter_model.safetensors", HEAD_FILE):
        assert_same_tensors(
            saved(til_dir / "lora_task_1" / "task-0", file), saved(til_dir / "lora_task_0" / "task-0", file)
        )
    assert til["bwt"] == 0.0
    assert all(v >= 0.75 for v in til["matrix"][2]), til["matrix"]  # the heads learned their keywords
    heads = [json.loads((til_dir / "lora_task_1" / f"task-{i}" / HEAD_CONFIG).read_text()) for i in (0, 1)]
    assert [h["labels"] for h in heads] == [["no", "yes"], ["blue", "red"]]
    assert heads[0]["classifier"] == "CosineLinear" and heads[0]["in_features"] == 32
    assert (til_dir / "lora_task_1" / ROUTER_FILE).is_file()
    # With one task seen, CIL over the global space equals TIL, with or without routing.
    assert til["matrix"][1][0] == cil["matrix"][1][0] == hard["matrix"][1][0]
    for result in (cil, hard):
        routed = result["extra_matrices"]["router_accuracy"]
        assert routed[1][0] == 1.0  # one seen task: every row goes to it
        assert all(0.0 <= routed[2][i] <= 1.0 for i in (0, 1))
        assert routed[0] == [None, None]
    assert "router_accuracy" not in til.get("extra_matrices", {})
    report = (tmp_path / "hard" / "report.md").read_text()
    assert "## router_accuracy (%)" in report
    # CIL predictions name the task whose class was predicted when it is not the evaluated one.
    lines = (tmp_path / "cil" / "predictions" / "after_2" / "task0.jsonl").read_text().splitlines()
    assert all(json.loads(x)["prediction"] in {"no", "yes", "task1:blue", "task1:red"} for x in lines)


def test_word_level_run_on_the_builtin_ner_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / "cache"))
    values = peft_values(
        tmp_path,
        tmp_path,
        dataset_dir="builtin://ner",
        cl_tasks="ner_person,ner_location",
        PEFT_type="PromptTuning",
        PEFT_num_virtual_tokens=3,
        classifier="Linear",
        classification_type="word-level",
        max_samples=12,
        eval_max_samples=6,
    )
    metrics = run(values)
    out = tmp_path / "run"
    assert all(0.0 <= v <= 1.0 for row in metrics["matrix"] for v in row)
    extra = metrics["extra_matrices"]
    assert {"entity_precision", "entity_recall", "router_accuracy"} <= set(extra)
    # What the F1 must be is checked on hand-made tags: test_word_score_by_hand (test_pertask.py).
    heads = [json.loads((out / "lora_task_1" / f"task-{i}" / HEAD_CONFIG).read_text()) for i in (0, 1)]
    assert heads[0]["labels"] == ["O", "B-PER", "I-PER"] and heads[1]["labels"] == ["B-LOC", "I-LOC"]
    for file in ("adapter_model.safetensors", HEAD_FILE):
        assert_same_tensors(
            saved(out / "lora_task_1" / "task-0", file), saved(out / "lora_task_0" / "task-0", file)
        )
    space = json.loads((out / "lora_task_1" / STATE_FILE).read_text())["label_space"]
    assert space["level"] == "word-level" and [t["name"] for t in space["tasks"]] == [
        "ner_person",
        "ner_location",
    ]
    rows = [
        json.loads(x)
        for x in (out / "predictions" / "after_2" / "ner_location.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 6
    allowed = {"O", "B-PER", "I-PER", "B-LOC", "I-LOC"}
    for row in rows:
        assert len(row["prediction"].split()) == len(row["answer"].split())
        assert set(row["prediction"].split()) <= allowed


def test_one_task_per_command_continues_adapters_heads_labels_and_router(tmp_path, data_dir):
    common = {"classifier": "Linear", "PEFT_type": "LoRA", "newlora_routing": "hard"}
    run(peft_values(tmp_path, data_dir, cl_tasks="task0", **common))
    out = tmp_path / "run"
    second = Session(
        parse_config(
            peft_values(
                tmp_path,
                data_dir,
                cl_tasks="task1",
                previous_task_model=str(out / "lora_task_0"),
                current_task_id=2,
                **common,
            )
        )
    )
    metrics = second.run()
    assert sorted(p.name for p in (out / "lora_task_1").iterdir() if p.is_dir()) == ["task-0", "task-1"]
    for file in ("adapter_model.safetensors", HEAD_FILE):
        assert_same_tensors(
            saved(out / "lora_task_1" / "task-0", file), saved(out / "lora_task_0" / "task-0", file)
        )
    space = json.loads((out / "lora_task_1" / STATE_FILE).read_text())["label_space"]
    assert [(t["index"], t["name"]) for t in space["tasks"]] == [(0, "task0"), (1, "task1")]
    # The router saved after task 0 knew one task; it grew to two and kept the first row.
    first, grown = saved(out / "lora_task_0", ROUTER_FILE), saved(out / "lora_task_1", ROUTER_FILE)
    assert first["mlp.2.weight"].shape[0] == 1 and grown["mlp.2.weight"].shape[0] == 2
    assert second.method.space.pre_accum(1) == [0, 2]
    assert metrics["tasks"] == ["task1"] and 0.0 <= metrics["matrix"][1][0] <= 1.0
    assert (out / "from_task2" / "metrics.json").is_file()


def test_a_killed_heads_run_resumes_mid_task_to_the_same_state(tmp_path, learnable_dir):
    values = peft_values(
        tmp_path,
        learnable_dir,
        cl_tasks="task0,task1",
        PEFT_type="LoRA",
        classifier="Linear",
        num_train_epochs=2,
        save_steps=1,
        learning_rate=1e-2,
    )
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({**values, "output_dir": str(killed)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", KILL_DURING_TASK_2, str(config_file)], capture_output=True, text=True, env=env
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert list((killed / "checkpoints" / "task_2").glob("checkpoint-*"))
    resumed = Session(parse_config({**values, "output_dir": str(killed)}))
    steps = []
    resumed.method.callbacks = lambda model: [_Steps(steps)]
    resumed_metrics = resumed.run()
    assert steps[0] == 2, "task 2 goes on after its last checkpoint (step 1)"
    clean_metrics = run({**values, "output_dir": str(clean)})
    for directory in ("lora_task_0", "lora_task_1"):
        files = sorted(p.relative_to(clean) for p in (clean / directory).glob("**/*.safetensors"))
        assert files == sorted(p.relative_to(killed) for p in (killed / directory).glob("**/*.safetensors"))
        for file in files:
            assert_same_tensors(load_file(str(killed / file)), load_file(str(clean / file)))
    assert resumed_metrics["matrix"] == clean_metrics["matrix"]


class _Steps(TrainerCallback):
    def __init__(self, steps):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
