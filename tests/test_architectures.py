"""Every generative method on each of the six tiny architectures, and what differs between them."""

import json
import math

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from retain.cl.registry import method_specs, parse_config
from retain.errors import ModelError
from retain.hparams.args import FinetuningArguments
from retain.model.adapters import add_lora, lora_config
from retain.model.tiny import ARCHITECTURES, build_tiny_model, build_tiny_tokenizer
from retain.training.sequence import Session
from tests.conftest import SMALL_METHOD_VALUES, small_tasks, write_task_family

#: Per-method overrides for the matrix; a method without an entry runs with its defaults.
METHOD_VALUES = SMALL_METHOD_VALUES
GENERATIVE = sorted(method_specs())


@pytest.fixture(scope="module")
def tasks_with_a_system_prompt(tmp_path_factory):
    root = write_task_family(tmp_path_factory.mktemp("arch") / "data", small_tasks(2, rows=8))
    info = json.loads((root / "dataset_info.json").read_text())
    for entry in info.values():  # every row gets a system text: Gemma's template has no system role
        rows = json.loads((root / entry["file_name"]).read_text())
        (root / entry["file_name"]).write_text(json.dumps([{**row, "system": "Be brief."} for row in rows]))
        entry["columns"] = {"system": "system"}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", GENERATIVE)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_method_runs_on_every_architecture(arch, method, tasks_with_a_system_prompt, tmp_path):
    values = {
        "model_name_or_path": f"tiny-random-{arch}",
        "cl_method": method,
        "dataset_dir": str(tasks_with_a_system_prompt),
        "cl_tasks": "task0,task1",
        "per_device_train_batch_size": 4,
        "max_samples": 4,
        "eval_max_samples": 2,
        "max_new_tokens": 2,
        "learning_rate": 1e-2,
        "lora_rank": 4,
        "logging_steps": 1,
        "seed": 0,
        "disable_tqdm": True,
        "eval_base_cache": False,
        "output_dir": str(tmp_path / "run"),
        **METHOD_VALUES.get(method, {}),
    }
    session = Session(parse_config({k: v for k, v in values.items() if v is not None}))
    metrics = session.run()
    assert len(metrics["matrix"]) == 3 and all(v is not None for v in metrics["matrix"][2])
    losses = [
        entry["loss"]
        for task in (1, 2)
        for entry in json.loads((tmp_path / "run" / "logs" / f"train_task_{task}.json").read_text())
        if "loss" in entry
    ]
    assert losses and all(math.isfinite(v) for v in losses)
    if arch == "gemma2":
        assert session.builder.fold_system  # the system text went into the first user turn


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_target_all_adapts_every_linear_layer_but_the_head(arch):
    tokenizer = build_tiny_tokenizer(arch)
    model = build_tiny_model(arch, tokenizer)
    layers = {
        name
        for name, module in model.named_modules()
        if type(module).__name__ in ("Linear", "Conv1D") and not name.endswith("lm_head")
    }
    adapted = add_lora(model, "default", lora_config(FinetuningArguments(lora_rank=2)))
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in adapted.named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    assert wrapped == layers
    if arch == "gpt2":  # GPT-2's fused attention and MLP are Conv1D layers
        assert {name.rsplit(".", 1)[-1] for name in wrapped} == {"c_attn", "c_proj", "c_fc"}


def test_named_targets_resolve_per_architecture():
    tokenizer = build_tiny_tokenizer("gpt2")
    adapted = add_lora(
        build_tiny_model("gpt2", tokenizer), "default", lora_config(FinetuningArguments(lora_target="c_attn"))
    )
    assert sum(isinstance(m, BaseTunerLayer) for m in adapted.modules()) == 4  # one per layer
    with pytest.raises(ModelError, match=r"'q_proj' .* this model's linear layers: c_attn, c_fc, c_proj"):
        add_lora(
            build_tiny_model("gpt2", tokenizer),
            "default",
            lora_config(FinetuningArguments(lora_target="q_proj")),
        )


@pytest.mark.parametrize("arch", ["phi3", "gemma2"])
def test_generation_stops_at_the_end_of_turn_token(arch):
    from retain.eval.predict import stop_token_ids

    tokenizer = build_tiny_tokenizer(arch)
    model = build_tiny_model(arch, tokenizer)
    stops = stop_token_ids(model, tokenizer)
    end_of_turn = "<|end|>" if arch == "phi3" else "<end_of_turn>"
    assert stops == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn)]
    assert torch.is_tensor(model.lm_head.weight)
