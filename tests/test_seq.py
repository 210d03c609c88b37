import pytest
import torch
from safetensors.torch import load_file

from retain.cl.registry import parse_config
from retain.model.adapters import adapter_parameters
from retain.training.sequence import Session


def snapshot(params):
    return {k: v.detach().clone() for k, v in params.items()}


def base_weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}


def test_seq_trains_lora_only_and_carries_the_adapter(tiny_config):
    session = Session(parse_config(tiny_config()))
    session.load()
    model = session.model
    lora_before = snapshot(adapter_parameters(model, "default"))
    base_before = base_weights(model)
    assert all(p.requires_grad for p in adapter_parameters(model, "default").values())
    assert not any(p.requires_grad for k, p in model.named_parameters() if "lora_" not in k)

    seen_at_begin = {}
    original_begin = session.method.begin_task

    def recording_begin(model, task, data):
        seen_at_begin[task.id] = snapshot(adapter_parameters(model, "default"))
        return original_begin(model, task, data)

    session.method.begin_task = recording_begin
    session.train_task(session.tasks[0], session.data[0])
    after_task1 = snapshot(adapter_parameters(model, "default"))
    changed = [k for k in after_task1 if not torch.equal(after_task1[k], lora_before[k])]
    assert len(changed) == len(after_task1), "every trainable LoRA tensor must change"
    for k, v in base_weights(model).items():
        assert torch.equal(v, base_before[k]), f"base weight {k} changed"

    session.train_task(session.tasks[1], session.data[1])
    # Task 2 started from task 1's adapter, not from a new one.
    for k, v in seen_at_begin[2].items():
        assert torch.equal(v, after_task1[k])
    # The saved task-1 adapter holds exactly the task-1 weights.
    saved = load_file(str(session.output_dir / "task_1" / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(after_task1)
    for v in saved.values():
        assert any(torch.equal(v, w) for w in after_task1.values())


def test_previous_task_model_starts_a_new_process_from_a_saved_task(tiny_config, tmp_path):
    first = Session(parse_config(tiny_config(cl_tasks="task0")))
    first.run(train=True, evaluate=False)
    trained = snapshot(adapter_parameters(first.model, "default"))

    second = Session(
        parse_config(
            tiny_config(
                cl_tasks="task1",
                previous_task_model=str(tmp_path / "run" / "task_1"),
                current_task_id=2,
                output_dir=str(tmp_path / "run"),
            )
        )
    )
    second.load()
    second.restore(0)
    for k, v in adapter_parameters(second.model, "default").items():
        assert torch.equal(v, trained[k])
    assert second.tasks[0].id == 2
    assert second.method.task_dir(second.tasks[0]).name == "task_2"


def test_adapter_weights_must_match_the_adapter_exactly(tmp_path):
    import dataclasses

    from retain.errors import ModelError
    from retain.hparams.args import FinetuningArguments
    from retain.model.adapters import add_lora, load_adapter_weights, lora_config, save_adapter
    from retain.model.tiny import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    args = FinetuningArguments(lora_rank=4, lora_target="q_proj,v_proj")
    small = add_lora(build_tiny_llama(tokenizer), "default", lora_config(args))
    full = add_lora(
        build_tiny_llama(tokenizer), "default", lora_config(dataclasses.replace(args, lora_target="all"))
    )
    save_adapter(small, "default", tmp_path / "small")
    save_adapter(full, "default", tmp_path / "full")
    with pytest.raises(ModelError, match=r"\d+ missing and 0 unexpected"):
        load_adapter_weights(full, "default", tmp_path / "small")  # fewer modules than the model's adapter
    with pytest.raises(ModelError, match=r"0 missing and \d+ unexpected"):
        load_adapter_weights(small, "default", tmp_path / "full")
    wider = add_lora(
        build_tiny_llama(tokenizer), "default", lora_config(dataclasses.replace(args, lora_rank=8))
    )
    with pytest.raises(ModelError, match="has shape"):
        load_adapter_weights(wider, "default", tmp_path / "small")
    load_adapter_weights(small, "default", tmp_path / "small")  # the matching adapter loads
