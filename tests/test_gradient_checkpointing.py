"""`gradient_checkpointing: true` works with every method and leaves the math unchanged.

For every registered method (and the variants of `peft`), a tiny 2-task run is trained twice,
without and with checkpointing: the per-step training losses must agree to 1e-5, and the decoder
layers must really have been recomputed (more grad-mode forward calls with checkpointing on).
"""

import json

import pytest
import torch

from retain.cl.registry import method_specs, parse_config
from retain.training.sequence import Session
from tests.conftest import SMALL_METHOD_VALUES, small_tasks, write_task_family

pytestmark = pytest.mark.slow

#: Per-variant overrides; a registered method without an entry runs with its defaults.
PEFT_HEADS = {"cl_method": "peft", "classifier": "Linear"}
VARIANTS = {
    **{name: {"cl_method": name, **SMALL_METHOD_VALUES.get(name, {})} for name in method_specs()},
    "peft": {"cl_method": "peft", "PEFT_type": "LoRA"},  # LoRA dropout 0.1 on: masks must be replayed
    "peft-prompt": {"cl_method": "peft", "PEFT_type": "PromptTuning", "PEFT_num_virtual_tokens": 3},
    "peft-sentence-heads": {**PEFT_HEADS, "PEFT_type": "LoRA", "Sub_PEFT_type": "NewLoRA"},
    "peft-word-heads": {
        **PEFT_HEADS,
        "PEFT_type": "PromptTuning",
        "PEFT_num_virtual_tokens": 3,
        "classification_type": "word-level",
        "dataset_dir": "builtin://ner",
        "cl_tasks": "ner_person,ner_location",
    },
}


@pytest.fixture(scope="module")
def two_label_tasks(tmp_path_factory):
    return write_task_family(tmp_path_factory.mktemp("gc") / "data", small_tasks(2, rows=12))


def inside_first_layer(model: torch.nn.Module) -> torch.nn.Module:
    """A module inside the first decoder layer: the layer's own hooks stay outside the checkpoint."""
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    return next(layer.children())


def train_losses(values: dict) -> tuple[list[list[float]], int]:
    """Per-step losses of each task, and how often the first decoder layer ran with grad enabled."""
    session = Session(parse_config(values))
    session.load()
    calls = []
    hook = inside_first_layer(session.model).register_forward_pre_hook(
        lambda *_: calls.append(1) if torch.is_grad_enabled() else None
    )
    try:
        session.run(evaluate=False)
    finally:
        hook.remove()
    logs = session.run_dir / "logs"
    histories = [json.loads((logs / f"train_task_{t.id}.json").read_text()) for t in session.tasks]
    return [[entry["loss"] for entry in history if "loss" in entry] for history in histories], len(calls)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpointing_trains_with_the_same_losses(variant, two_label_tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / "cache"))  # builtin://ner is generated there
    base = {
        "model_name_or_path": "tiny-random-llama",
        "dataset_dir": str(two_label_tasks),
        "cl_tasks": "task0,task1",
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_steps": 2,
        "logging_steps": 1,
        "max_samples": 8,
        "cutoff_len": 64,
        "seed": 0,
        "disable_tqdm": True,
        **VARIANTS[variant],
    }
    plain, plain_calls = train_losses({**base, "output_dir": str(tmp_path / "plain")})
    checkpointed, checkpointed_calls = train_losses(
        {**base, "output_dir": str(tmp_path / "checkpointed"), "gradient_checkpointing": True}
    )
    assert plain_calls > 0
    assert checkpointed_calls > plain_calls, "checkpointing on: the layers run again in backward"
    assert [len(losses) for losses in plain] == [len(losses) for losses in checkpointed] == [2, 2]
    for expected, got in zip(plain, checkpointed, strict=True):
        assert got == pytest.approx(expected, abs=1e-5)
