"""I-LoRA on the tiny model: the adapter hand-over, the step loss, EMA over runs and full runs."""

import json
import math

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from retain.cl.ilora import ILORATrainer, load_ilora_model, run_sft_ilora
from retain.cl.ilora.ilora import BUFFER_FILE
from retain.cl.ilora.ilora_math import (
    consistency_loss,
)
from retain.cl.loss import LossScale, causal_lm_loss
from retain.cl.registry import parse_config
from retain.data.prompt import pad_batch
from retain.errors import ConfigError, ModelError
from retain.hparams.args import CommonCLArguments
from retain.model.adapters import adapter_parameters, use_adapter
from retain.training.sequence import Session
from tests.ilora_helpers import (
    Recorder,
    assert_same,
    bare_method,
    differs,
    ilora_config,
    perturb,
    replay_recurrence,
    snapshot,
)
from tests.step_helpers import label_count, random_rows

# ---- adapters and the step -----------------------------------------------------------------------------


def test_adapter_switch_keeps_requires_grad_and_ema_starts_as_copy(tiny_config):
    method, model, _ = bare_method(tiny_config)
    assert_same(snapshot(model, "default"), snapshot(model, "ema"))
    default, ema = adapter_parameters(model, "default"), adapter_parameters(model, "ema")
    assert all(p.requires_grad for p in default.values()) and not any(p.requires_grad for p in ema.values())
    perturb(model, "ema", seed=1)
    x = torch.randint(0, 200, (1, 6))
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with use_adapter(model, "ema"):
            layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
            assert all(m.active_adapters == ["ema"] for m in layers)
            assert not any(p.requires_grad for p in ema.values())
            assert all(p.requires_grad for p in default.values())
            stable = model(input_ids=x).logits
        again = model(input_ids=x).logits
    assert not torch.allclose(plain, stable) and torch.equal(plain, again)
    # Evaluation answers with the EMA adapter by default, and leaves the flags alone.
    from retain.cl.base import Task

    with method.evaluation(model, Task(0, "a"), Task(0, "a")), torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, stable)
    assert not any(p.requires_grad for p in ema.values())
    # This is why: peft's own set_adapter makes the adapter it activates trainable.
    model.set_adapter("ema")
    assert all(p.requires_grad for p in ema.values())


def test_stable_pass_through_the_body_matches_the_full_model(tiny_config):
    method, model, _ = bare_method(tiny_config, hidden_state_layers="all")
    perturb(model, "ema", seed=2)
    batch = pad_batch(random_rows(3, seed=1), pad_id=0)
    model.train()
    stable = method.stable_hidden_states(batch)
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad(), use_adapter(model, "ema"):
        model.eval()
        full = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
    assert method.layer_indices == [1, 2, 3, 4] and len(stable) == 4
    for got, index in zip(stable, method.layer_indices, strict=True):
        torch.testing.assert_close(got, full.hidden_states[index])


def test_step_loss_is_the_composition_and_invariant_to_accumulation(tiny_config):
    method, model, tokenizer = bare_method(
        tiny_config, min_update_threshold=0.1, consistency_weight=2.0, ilora_replay_batch_size=8
    )
    for row in random_rows(12, seed=7):
        method.buffer.add(row)
    perturb(model, "ema", seed=3, scale=0.2)
    model.train()
    rows = random_rows(8, seed=11)
    batch = pad_batch(rows, tokenizer.pad_token_id)
    rng_state = method.buffer.rng.getstate()

    # One micro-batch of 8 rows with 8 replayed rows.
    method.begin_step([batch])
    chunk = method._plan[0]
    loss = method.compute_loss(model, batch, LossScale(num_items=label_count(batch)))
    loss.backward()
    grads_one = {k: p.grad.clone() for k, p in adapter_parameters(model, "default").items()}
    model.zero_grad()

    # By hand, with separate forward passes.
    replay = chunk.batch
    assert replay["input_ids"].size(0) == 8 and chunk.step_label_tokens == label_count(replay)
    with torch.no_grad():
        l_cur = causal_lm_loss(model, batch, LossScale(num_items=None))
        l_buf = causal_lm_loss(model, replay, LossScale(num_items=None))
        plastic = model(**replay, output_hidden_states=True).hidden_states
        with use_adapter(model, "ema"):
            stable = model(**replay, output_hidden_states=True).hidden_states
        layers = [2, 3, 4]  # -3, -2, -1 of the 4-layer model
        l_cons = consistency_loss(
            [plastic[i] for i in layers], [stable[i] for i in layers], replay["attention_mask"], threshold=0.1
        )
    assert l_cons.item() > 1e-4
    expected = 0.5 * (l_cur + l_buf) + 2.0 * l_cons
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in adapter_parameters(model, "ema").values())

    # The same step as 4 micro-batches of 2 rows, replaying 2 rows each: same total, same gradient.
    method.buffer.rng.setstate(rng_state)
    method.replay_batch_size = 2
    micro = [pad_batch(rows[i : i + 2], tokenizer.pad_token_id) for i in range(0, 8, 2)]
    method.begin_step(micro)
    assert torch.equal(
        torch.cat([c.batch["input_ids"][:, :1] for c in method._plan]), replay["input_ids"][:, :1]
    )
    total = 0.0
    for part in micro:
        part_loss = method.compute_loss(
            model, part, LossScale(num_items=label_count(batch), accumulation_steps=4)
        )
        part_loss.backward()
        total = total + part_loss.detach()
    torch.testing.assert_close(total, loss.detach(), atol=1e-5, rtol=1e-5)
    for k, p in adapter_parameters(model, "default").items():
        torch.testing.assert_close(p.grad, grads_one[k], atol=1e-6, rtol=1e-4)
    model.zero_grad()

    # An empty buffer: the plain current-batch loss.
    method.buffer.rows = []
    method.begin_step([batch])
    plain = method.compute_loss(model, batch, LossScale(num_items=label_count(batch)))
    torch.testing.assert_close(plain, causal_lm_loss(model, batch, LossScale(num_items=label_count(batch))))
    # Outside a planned training step the trainer hook is missing: a clear error, not a silent loss.
    with pytest.raises(Exception, match="begin_step"):
        method.compute_loss(model, batch, LossScale(num_items=label_count(batch)))


# ---- sessions -------------------------------------------------------------------------------------------


def test_ema_recurrence_handover_and_previous_task_model(tiny_config, tmp_path):
    # In process: two tasks of two optimizer steps each.
    session = Session(
        parse_config(ilora_config(tiny_config, cl_tasks="task0,task1", output_dir=str(tmp_path / "a")))
    )
    recorder = Recorder(session.method)
    session.run(train=True, evaluate=False)
    model = session.model
    assert recorder.grad_checks == 4
    for task_id in (1, 2):
        start_default, start_ema = recorder.starts[task_id]
        assert_same(start_default, start_ema)  # each task starts with default == ema
        updates = recorder.updates[task_id]
        assert len(updates) == 2
        expected = replay_recurrence(start_ema, updates, alpha=0.25)
        assert_same(recorder.ema_after[task_id], expected, atol=1e-6)
        assert differs(recorder.ema_after[task_id], start_ema), "the EMA adapter must move"
        assert differs(recorder.ema_after[task_id], updates[-1][0]), "with a = 0.25 the EMA lags default"
    # Hand-over: task 2 started from task 1's EMA adapter, in both adapters.
    assert_same(recorder.starts[2][0], recorder.ema_after[1])
    # Task 1's saved adapters are exactly its final default and EMA.
    saved = session.output_dir / "ilora_task1"
    for name, weights in (("ema", recorder.ema_after[1]), ("default", recorder.updates[1][-1][0])):
        tensors = load_file(str(saved / name / "adapter_model.safetensors"))
        assert len(tensors) == len(weights)
        assert all(any(torch.equal(v, w) for w in weights.values()) for v in tensors.values())
    final_a = (snapshot(model, "default"), snapshot(model, "ema"))
    buffer_a = list(session.method.buffer.rows)
    assert session.method.buffer.num_seen == 16 and len(buffer_a) == 16

    # The same two tasks as two processes, the second through previous_task_model.
    out_b = tmp_path / "b"
    first = Session(parse_config(ilora_config(tiny_config, cl_tasks="task0", output_dir=str(out_b))))
    first.run(train=True, evaluate=False)
    second = Session(
        parse_config(
            ilora_config(
                tiny_config,
                cl_tasks="task1",
                previous_task_model=str(out_b / "ilora_task1"),
                current_task_id=2,
                output_dir=str(out_b),
            )
        )
    )
    recorder_b = Recorder(second.method)
    second.run(train=True, evaluate=False)
    assert_same(recorder_b.starts[2][0], recorder.ema_after[1])
    assert_same(recorder_b.starts[2][1], recorder.ema_after[1])
    assert (out_b / "ilora_task2" / "default").is_dir() and (out_b / "ilora_task2" / "ema").is_dir()
    assert_same(snapshot(second.model, "default"), final_a[0], atol=1e-6)
    assert_same(snapshot(second.model, "ema"), final_a[1], atol=1e-6)
    assert second.method.buffer.rows == buffer_a

    # ema_adapter_path overrides where the EMA is read from (here: task 1's plastic adapter).
    third = Session(
        parse_config(
            ilora_config(
                tiny_config,
                cl_tasks="task1",
                previous_task_model=str(out_b / "ilora_task1"),
                ema_adapter_path=str(out_b / "ilora_task1" / "default"),
                current_task_id=2,
                output_dir=str(tmp_path / "c"),
            )
        )
    )
    third.load()
    third.restore(0)
    third.method.begin_task(third.model, third.tasks[0], third.data[0])
    assert_same(snapshot(third.model, "default"), recorder.updates[1][-1][0])
    assert_same(snapshot(third.model, "ema"), recorder.updates[1][-1][0])

    # The loader alone gives the same starting point; a non-I-LoRA directory is a clear error.
    cl_args = CommonCLArguments(previous_task_model=str(out_b / "ilora_task1"))
    loaded, _ = load_ilora_model(third.config.model, third.config.finetuning, cl_args)
    assert_same(snapshot(loaded, "default"), recorder.ema_after[1])
    with pytest.raises(ModelError, match="not found"):
        third.method.load_task(third.model, None, tmp_path)


def test_ema_alpha_zero_keeps_ema_equal_to_default(tiny_config):
    session = Session(parse_config(ilora_config(tiny_config, cl_tasks="task0", ema_alpha=0.0)))
    recorder = Recorder(session.method)
    session.run(train=True, evaluate=False)
    assert len(recorder.updates[1]) == 2
    assert differs(snapshot(session.model, "default"), recorder.starts[1][0])
    assert_same(snapshot(session.model, "ema"), snapshot(session.model, "default"))


def test_three_task_run_writes_the_seed_layout(tiny_config, tmp_path):
    values = ilora_config(
        tiny_config, max_samples=4, eval_max_samples=2, max_new_tokens=2, output_dir=str(tmp_path / "run")
    )
    session = Session(parse_config(values))
    metrics = session.run()
    out = tmp_path / "run"
    for k in (1, 2, 3):
        task_dir = out / f"ilora_task{k}"
        for name in ("default", "ema"):
            assert (task_dir / name / "adapter_model.safetensors").is_file()
            config = json.loads((task_dir / name / "adapter_config.json").read_text())
            assert config["r"] == 4
        assert (task_dir / BUFFER_FILE).is_file()
    assert not (out / "task_1").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == "ilora" and saved["matrix"] == metrics["matrix"]
    numbers = [v for row in metrics["matrix"] for v in row] + [
        metrics[k] for k in ("last", "avg", "bwt", "fwt")
    ]
    assert all(isinstance(v, float) and math.isfinite(v) for v in numbers)
    # A new process restores task 3's state from disk exactly and scores it the same (with `ema`).
    later = Session(parse_config(values))
    later.load()
    later.restore(3)
    assert_same(snapshot(later.model, "ema"), snapshot(session.model, "ema"))
    assert_same(snapshot(later.model, "default"), snapshot(session.model, "default"))
    assert later.method.buffer.rows == session.method.buffer.rows
    assert later.evaluate_entry(3, 0) == metrics["matrix"][3][0]
    # The workflow entry point is this same run, and refuses another method.
    assert run_sft_ilora(values, train=False)["matrix"] == metrics["matrix"]
    with pytest.raises(ConfigError):
        run_sft_ilora(tiny_config(cl_method="seq"))


def test_gradient_accumulation_gives_the_same_total_loss(tiny_config, tmp_path, monkeypatch):
    from retain.training import trainer as trainer_module

    history = []
    original = trainer_module.CLTrainer.log

    def log(self, logs, *args, **kwargs):
        history.append(dict(logs))
        return original(self, logs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.CLTrainer, "log", log)

    def one_step(batch, accumulation):
        config = parse_config(
            ilora_config(
                tiny_config,
                cl_tasks="task0",
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
                optim="sgd",
                learning_rate=0.5,
                logging_steps=1,
                output_dir=str(tmp_path / f"run_{batch}x{accumulation}"),
            )
        )
        session = Session(config)
        session.load()
        method = session.method
        for row in session.data[0].train_rows:  # a full buffer, so the step replays 8 rows
            method.buffer.add(row)
        begin, cons = method.begin_task, method.compute_consistency_loss
        consistency = []

        def begin_task(model, task, data):
            begin(model, task, data)
            perturb(model, "ema", seed=4, scale=0.2)  # make l_cons non-zero in the very first step

        def record(*args, **kwargs):
            value = cons(*args, **kwargs)
            consistency.append(value.item())
            return value

        method.begin_task, method.compute_consistency_loss = begin_task, record
        history.clear()
        session.train_task(session.tasks[0], session.data[0])
        losses = [h["loss"] for h in history if "loss" in h]
        assert len(losses) == 1
        return losses[0], sum(consistency), snapshot(session.model, "default")

    loss1, cons1, weights1 = one_step(batch=8, accumulation=1)
    loss4, cons4, weights4 = one_step(batch=2, accumulation=4)
    assert cons1 > 1e-4
    assert cons4 == pytest.approx(cons1, rel=1e-4)
    assert loss4 == pytest.approx(loss1, abs=1e-5)
    # SGD: the update is proportional to the gradient, so a mis-scaled term would show here.
    assert_same(weights4, weights1, atol=1e-6)


def test_seed_ilora_trainer_wires_the_method_and_its_ema_callback(tiny_config, tmp_path):
    from datasets import Dataset

    from retain.cl.base import Task
    from retain.cl.ilora.ilora import ILORACallback

    session = Session(parse_config(ilora_config(tiny_config, cl_tasks="task0")))
    session.load()
    method = session.method
    trainer = ILORATrainer(
        model=session.model,
        args=session.config.training,
        train_dataset=Dataset.from_list(session.data[0].train_rows),
        data_collator=method.collator(session.tokenizer),
        ilora=method,
        task=Task(0, "task0"),
    )
    callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ILORACallback)]
    assert len(callbacks) == 1 and callbacks[0].method is method and trainer.method is method
    with pytest.raises(TypeError, match="needs an ILORA method"):
        ILORATrainer(
            model=session.model, args=session.config.training, method=object(), task=Task(0, "task0")
        )


def test_split_pass_gives_the_joined_gradients_one_half_at_a_time(tiny_config):
    """`ilora_pass: split` backpropagates L_cur / 2, then L_buf / 2 + w * l_cons: the same loss and gradients
    as the joined pass, with one half's activations alive at a time."""
    grads, losses, parts = {}, {}, {}
    for mode in ("joined", "split"):
        torch.manual_seed(0)  # the same adapter initialisation for both
        method, model, tokenizer = bare_method(
            tiny_config, ilora_pass=mode, consistency_weight=2.0, ilora_replay_batch_size=6
        )
        for row in random_rows(12, seed=7):
            method.buffer.add(row)
        perturb(model, "ema", seed=3, scale=0.2)
        model.train()
        batch = pad_batch(random_rows(8, seed=11), tokenizer.pad_token_id)
        method.begin_step([batch])
        pieces = method.loss_parts(model, batch, LossScale(num_items=label_count(batch)))
        parts[mode] = len(pieces)
        total = 0.0
        for piece in pieces:
            value = piece()
            value.backward()  # as CLTrainer does: each part's graph is freed before the next part runs
            total = total + value.detach()
        losses[mode] = total
        grads[mode] = {k: p.grad.clone() for k, p in adapter_parameters(model, "default").items()}
        assert all(p.grad is None for p in adapter_parameters(model, "ema").values())
    assert parts == {"joined": 1, "split": 2}
    torch.testing.assert_close(losses["split"], losses["joined"], atol=1e-5, rtol=1e-5)
    for key in grads["joined"]:
        torch.testing.assert_close(grads["split"][key], grads["joined"][key], atol=1e-6, rtol=1e-4)
