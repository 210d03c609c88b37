"""`retain export`: adapter folders that PEFT loads, and merged models whose answers are the run's."""

import contextlib
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from retain.cli import main
from retain.data.prompt import PromptBuilder
from retain.errors import RetainError
from retain.eval.predict import generate_answers
from retain.export import export_run
from retain.model.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory):
    """A finished 2-task seq run on tasks the tiny model learns."""
    import retain
    from tests.conftest import constant_tasks, write_task_family

    root = tmp_path_factory.mktemp("export")
    data = write_task_family(root / "data", constant_tasks(2))
    values = {
        "model_name_or_path": "tiny-random-llama",
        "dataset_dir": "data",
        "cl_tasks": "task0,task1",
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "num_train_epochs": 2,
        "lora_rank": 4,
        "seed": 0,
        "disable_tqdm": True,
        "output_dir": "run",
    }
    # Run in `root` with paths relative to it, as users write them; the tests export from elsewhere.
    with contextlib.chdir(root):
        metrics = retain.run(values)
    assert max(v for row in metrics["matrix"] for v in row) > 0, "the run must learn something"
    return root / "run", data


def run_predictions(run_dir, after, task):
    lines = (run_dir / "predictions" / f"after_{after}" / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line)["prediction"] for line in lines]


def answers(model, tokenizer, data_dir, task):
    from retain.data.registry import load_dataset_info, load_examples

    builder = PromptBuilder(tokenizer)
    rows = load_examples(data_dir, load_dataset_info(data_dir), f"{task}_test")
    prompts = [builder.prompt_ids(e) for e in rows]
    return generate_answers(model, tokenizer, prompts, batch_size=8, max_new_tokens=5)


def test_adapter_folder_loads_with_peft_and_answers_as_the_run(seq_run, tmp_path):
    run_dir, data = seq_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    folder = tmp_path / "adapter"
    files = {p.name for p in folder.iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "retain_export.json"}
    saved = load_file(str(run_dir / "task_2" / "adapter" / "adapter_model.safetensors"))
    exported = load_file(str(folder / "adapter_model.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    tokenizer = build_tiny_tokenizer()
    model = PeftModel.from_pretrained(build_tiny_model("llama", tokenizer), str(folder))
    for task in ("task0", "task1"):
        assert answers(model, tokenizer, data, task) == run_predictions(run_dir, 2, task)


def test_merged_model_answers_as_the_run(seq_run, tmp_path):
    run_dir, data = seq_run
    out = tmp_path / "merged"
    export_run(run_dir, out, after=1, merge=True)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    for task in ("task0", "task1"):
        assert answers(model, tokenizer, data, task) == run_predictions(run_dir, 1, task)


def test_export_errors_are_one_line(seq_run, tmp_path, capsys):
    run_dir, _ = seq_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--after", "5"]) == 2
    assert "task 5 is not trained in this run (trained: [1, 2])" in capsys.readouterr().err
    with pytest.raises(RetainError, match="not a run folder"):
        export_run(tmp_path, tmp_path / "y")


def test_out_replaces_only_an_earlier_export(seq_run, tmp_path, capsys):
    run_dir, _ = seq_run
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "a.txt").write_text("mine")
    for out, message in [
        ("notes.txt", "is an existing file; an export is a folder"),
        ("work", "holds files and is not an earlier export (no retain_export.json)"),
    ]:
        assert main(["export", str(run_dir), "--out", str(tmp_path / out)]) == 2
        assert f"'--out': {tmp_path / out} {message}" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == (tmp_path / "work" / "a.txt").read_text() == "mine"
    assert main(["export", str(run_dir), "--out", str(run_dir)]) == 2  # the run folder itself
    assert (run_dir / "state.json").is_file()
    blocked = tmp_path / "notes.txt" / "out"  # its parent is a file: nothing can be written there
    assert main(["export", str(run_dir), "--out", str(blocked)]) == 2
    assert f"'--out': {tmp_path / 'notes.txt'} is an existing file, not a folder" in capsys.readouterr().err
    # An earlier export is replaced, and its record says what it holds.
    out = tmp_path / "adapter"
    export_run(run_dir, out, after=2)
    export_run(run_dir, out, after=1)
    record = json.loads((out / "retain_export.json").read_text())
    assert record == {"run_dir": str(run_dir.resolve()), "after": 1, "task": "task0", "merge": False}


def test_ilora_exports_the_adapter_that_answers(tiny_config, tmp_path):
    import retain

    retain.run(tiny_config(cl_method="ilora", cl_tasks="task0,task1", max_samples=8))
    export_run(tmp_path / "run", tmp_path / "out")
    saved = load_file(str(tmp_path / "run" / "ilora_task2" / "ema" / "adapter_model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)


def test_a_quantized_run_merges_into_a_dequantized_base(tiny_config, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    import retain

    retain.run(tiny_config(cl_tasks="task0", quantization_bit=4, max_samples=8, eval_base_cache=False))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert "merged into the base loaded without quantization" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_peft_exports_one_folder_per_task_with_its_head(tmp_path):
    import retain
    from retain.cl.pertask.adapters import load_exported_head
    from tests.conftest import small_tasks, write_task_family

    data = write_task_family(tmp_path / "data", small_tasks(2, rows=10))
    values = {
        "model_name_or_path": "tiny-random-llama",
        "cl_method": "peft",
        "PEFT_type": "LoRA",
        "classifier": "Linear",
        "Sub_PEFT_type": "None",
        "il_mode": "TIL",
        "dataset_dir": str(data),
        "cl_tasks": "task0,task1",
        "per_device_train_batch_size": 4,
        "disable_tqdm": True,
        "output_dir": str(tmp_path / "run"),
    }
    retain.run(values)
    export_run(tmp_path / "run", tmp_path / "out")
    for index, labels in ((0, ["no", "yes"]), (1, ["blue", "red"])):
        folder = tmp_path / "out" / f"task-{index}"
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        head, head_labels = load_exported_head(folder)
        saved = load_file(str(tmp_path / "run" / "lora_task_1" / f"task-{index}" / "head.safetensors"))
        assert head_labels == labels and all(torch.equal(head.state_dict()[k], saved[k]) for k in saved)
    with pytest.raises(RetainError, match="classifier heads stay adapters"):
        export_run(tmp_path / "run", tmp_path / "merged", merge=True)


def test_a_stack_exports_as_one_lora_that_answers_as_the_stack(tiny_config, learnable_dir, tmp_path):
    import retain
    from retain.cl.registry import parse_config
    from retain.training.sequence import Session

    values = tiny_config(
        cl_method="olora", dataset_dir=str(learnable_dir), cl_tasks="task0,task1", learning_rate=1e-2
    )
    retain.run(values)
    export_run(tmp_path / "run", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 2 * 4 and config["lora_alpha"] == 2 * 8  # two tasks' LoRAs, rank 4, alpha 8 each
    session = Session(parse_config(values))
    session.load()
    session.restore(2)
    tokenizer = build_tiny_tokenizer()
    exported = PeftModel.from_pretrained(build_tiny_model("llama", tokenizer), str(tmp_path / "out"))
    ids = torch.tensor([tokenizer("Task 1. item 3", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), session.method.evaluation(session.model, session.tasks[1], session.tasks[0]):
        stacked = session.model(input_ids=ids).logits
        merged = exported(input_ids=ids).logits
    torch.testing.assert_close(merged, stacked, atol=1e-5, rtol=1e-5)
