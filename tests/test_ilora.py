"""I-LoRA: the math against hand computations, the buffer, the adapter hand-over and full runs."""

import json
import logging
import math
import random
from collections import Counter

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import TrainerCallback

from retain.cl.ilora import ILORA, Buffer, ILORAArguments, ILORATrainer, load_ilora_model, run_sft_ilora
from retain.cl.ilora.ilora import BUFFER_FILE
from retain.cl.ilora.ilora_math import (
    concat_right_padded,
    consistency_loss,
    ema_decay,
    ema_update_,
    resolve_hidden_layers,
    selective_mask,
)
from retain.cl.loss import LossScale, causal_lm_loss
from retain.cl.registry import parse_config
from retain.data.prompt import IGNORE_INDEX, pad_batch
from retain.errors import ConfigError, ModelError
from retain.hparams.args import CommonCLArguments
from retain.model.adapters import adapter_parameters, use_adapter
from retain.model.tiny import build_tiny_llama, build_tiny_tokenizer
from retain.training.sequence import Session

# ---- helpers -------------------------------------------------------------------------------------------


def snapshot(model, name):
    return {k: v.detach().clone() for k, v in adapter_parameters(model, name).items()}


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0.0, msg=lambda m, k=k: f"{k}: {m}")


def differs(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def perturb(model, name, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    for param in adapter_parameters(model, name).values():
        param.add_(scale * torch.randn(param.shape, generator=gen))


class Recorder:
    """Wraps a method's hooks to record the adapters at task starts and around every EMA update,
    and checks after every backward pass that the EMA adapter has no gradient and is not optimised."""

    def __init__(self, method):
        self.method = method
        self.starts = {}  # task id -> (default, ema) at the start of the task
        self.updates = {}  # task id -> [(default after the optimizer step, decay)]
        self.ema_after = {}
        self.grad_checks = 0
        self.task = None
        begin, update, callbacks = method.begin_task, method.update_ema_weights, method.callbacks

        def begin_task(model, task, data):
            begin(model, task, data)
            self.task = task.id
            self.starts[task.id] = (snapshot(model, "default"), snapshot(model, "ema"))
            self.updates[task.id] = []

        def update_ema_weights():
            default = snapshot(method.model, "default")
            decay = update()
            self.updates[self.task].append((default, decay))
            self.ema_after[self.task] = snapshot(method.model, "ema")
            return decay

        def with_check(model):
            return [*callbacks(model), GradCheck(self)]

        method.begin_task, method.update_ema_weights, method.callbacks = (
            begin_task,
            update_ema_weights,
            with_check,
        )


class GradCheck(TrainerCallback):
    def __init__(self, recorder):
        self.recorder = recorder

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        ema = adapter_parameters(model, "ema").values()
        default = adapter_parameters(model, "default").values()
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert all(p.grad is None and not p.requires_grad for p in ema)
        assert not any(id(p) in optimised for p in ema)
        assert all(p.grad is not None and p.requires_grad for p in default)
        assert all(id(p) in optimised for p in default)
        self.recorder.grad_checks += 1


def replay_recurrence(start_ema, updates, alpha):
    ema = {k: v.clone() for k, v in start_ema.items()}
    for t, (default, decay) in enumerate(updates):
        a = min(1 - 1 / (t + 1), alpha)
        assert decay == a
        ema = {k: a * ema[k] + (1 - a) * default[k] for k in ema}
    return ema


def ilora_config(tiny_config, **overrides):
    values = {"cl_method": "ilora", "max_samples": 8, "lora_dropout": 0.0}  # 8 rows / batch 4: 2 steps
    values.update(overrides)
    return tiny_config(**values)


def bare_method(tiny_config, **overrides):
    """An ILORA instance wrapping the tiny model, without a session (for step-level checks)."""
    method = ILORA(parse_config(ilora_config(tiny_config, cl_tasks="task0", **overrides)))
    tokenizer = build_tiny_tokenizer()
    model = method.prepare_model(build_tiny_llama(tokenizer), tokenizer)
    return method, model, tokenizer


def random_rows(count, seed, vocab=200, prompt=(3, 9), answer=(1, 5)):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        p, a = rng.randint(*prompt), rng.randint(*answer)
        ids = [rng.randrange(vocab) for _ in range(p + a)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return rows


def label_count(batch):
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# ---- pure math -----------------------------------------------------------------------------------------


def test_ema_decay_and_fused_update():
    assert [ema_decay(t, 0.25) for t in range(4)] == [0.0, 0.25, 0.25, 0.25]
    assert [ema_decay(t, 0.9) for t in range(4)] == [0.0, 0.5, pytest.approx(2 / 3), 0.75]
    assert ema_decay(5, 0.0) == 0.0
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    online = [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])]
    ema_update_(ema, online, 0.25)
    # 0.25 * ema + 0.75 * online
    assert ema[0].tolist() == [2.5, -1.0] and ema[1].tolist() == [[1.0]]
    ema_update_(ema, online, 0.0)
    assert torch.equal(ema[0], online[0]) and torch.equal(ema[1], online[1])


def test_consistency_loss_by_hand():
    # One layer, one row, two tokens, two hidden units.
    p = torch.tensor([[[1.0, -2.0], [3.0, 0.45]]], requires_grad=True)
    s = torch.tensor([[[0.5, -1.0], [3.5, 0.4]]])
    both = torch.tensor([[1, 1]])
    # plastic > stable at (0,0) and (1,1): those are their own target. The others pull to stable:
    # (-2 - -1)^2 + (3 - 3.5)^2 = 1.25, over 1 layer * 2 tokens * 2 units.
    loss = consistency_loss([p], [s], both, selective=True, threshold=0.0)
    assert loss.item() == pytest.approx(1.25 / 4)
    loss.backward()
    # d/dp (p - s)^2 / 4 = (p - s) / 2 where not selected, 0 where selected.
    assert p.grad.tolist() == [[[0.0, -0.5], [-0.25, 0.0]]]
    # Selective off: every element pulls to stable: 0.25 + 1 + 0.25 + 0.0025.
    off = consistency_loss([p], [s], both, selective=False)
    assert off.item() == pytest.approx(1.5025 / 4)
    # Padding masked: the second token is padding; the first gives 0 (selected) + 1, over 1 token * 2 units.
    assert consistency_loss([p], [s], torch.tensor([[1, 0]])).item() == pytest.approx(1.0 / 2)
    assert consistency_loss([p], [s], torch.tensor([[1, 0]]), selective=False).item() == pytest.approx(
        1.25 / 2
    )
    # Threshold 0.25 (relative): selected iff p > s + 0.25 |s|. 1 > 0.625 yes; 0.45 > 0.5 no, so the
    # last element now pulls to stable too: 1.25 + 0.0025.
    assert consistency_loss([p], [s], both, threshold=0.25).item() == pytest.approx(1.2525 / 4)
    # Threshold 1: 1 > 0.5 + 0.5 fails too: everything pulls, same as selective off.
    assert consistency_loss([p], [s], both, threshold=1.0).item() == pytest.approx(1.5025 / 4)
    # Two layers: the mean over layers. Second layer: all zeros vs all ones (never selected): 1 per element.
    p2, s2 = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    assert consistency_loss([p, p2], [s, s2], both).item() == pytest.approx((1.25 + 4.0) / 8)
    # An explicit token count (the trainer passes the step's count).
    assert consistency_loss([p], [s], both, num_tokens=4).item() == pytest.approx(1.25 / 8)


def test_threshold_zero_is_the_seed_rule():
    gen = torch.Generator().manual_seed(0)
    plastic = [torch.randn(2, 5, 8, generator=gen) for _ in range(3)]
    stable = [x + 0.3 * torch.randn(2, 5, 8, generator=gen) for x in plastic]
    stable[0][0, 0, :4] = plastic[0][0, 0, :4]  # ties are not selected by the seed either
    for p, s in zip(plastic, stable, strict=True):
        assert torch.equal(selective_mask(p, s, 0.0), p > s)
    # The seed's loss: mean over everything of (plastic - where(plastic > stable, plastic, stable))^2.
    reg = [torch.where(p > s, p, s) for p, s in zip(plastic, stable, strict=True)]
    seed = torch.mean(torch.cat([(p - r) ** 2 for p, r in zip(plastic, reg, strict=True)], dim=0))
    ours = consistency_loss(plastic, stable, torch.ones(2, 5), threshold=0.0)
    torch.testing.assert_close(ours, seed)


def test_resolve_hidden_layers():
    assert resolve_hidden_layers([-1, -2, -3], 4) == [2, 3, 4]
    assert resolve_hidden_layers("all", 4) == [1, 2, 3, 4]
    assert resolve_hidden_layers([0, 4], 4) == [0, 4]  # 0: the embeddings; 4 == -1: the final normed output
    with pytest.raises(ConfigError, match="out of range"):
        resolve_hidden_layers([-6], 4)
    with pytest.raises(ConfigError, match="twice"):
        resolve_hidden_layers([-1, 4], 4)
    with pytest.raises(ConfigError, match="twice"):
        resolve_hidden_layers([0, -5], 4)


def test_concat_right_padded():
    a = pad_batch([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}], 0)
    b = pad_batch([{"input_ids": [4], "labels": [4]}, {"input_ids": [5, 6, 7, 8], "labels": [-100] * 4}], 0)
    joined = concat_right_padded(a, b, pad_id=0)
    assert joined["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 7, 8]]
    assert joined["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100], [-100] * 4]
    assert joined["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


# ---- configuration -------------------------------------------------------------------------------------


def test_arguments_defaults_and_checks(caplog):
    args = ILORAArguments()
    assert (args.use_ilora, args.ema_alpha, args.consistency_weight, args.save_ema_adapter) == (
        False,
        0.25,
        1.0,
        True,
    )
    assert (args.ema_adapter_path, args.selective_update, args.min_update_threshold) == (None, True, 0.1)
    assert (args.hidden_state_layers, args.ilora_buffer_size, args.ilora_eval_adapter) == (
        [-1, -2, -3],
        500,
        "ema",
    )
    base = {"model_name_or_path": "tiny-random-llama", "cl_tasks": "a"}
    assert parse_config({**base, "use_ilora": True}).cl.cl_method == "ilora"
    assert parse_config({**base, "use_ilora": True}).method_args.use_ilora is True
    assert parse_config({**base, "cl_method": "ilora"}).method_args.use_ilora is True
    assert (
        parse_config(
            {**base, "cl_method": "ilora", "hidden_state_layers": "all"}
        ).method_args.hidden_state_layers
        == "all"
    )
    assert parse_config(
        {**base, "cl_method": "ilora", "hidden_state_layers": "-1,-4"}
    ).method_args.hidden_state_layers == [-1, -4]
    bad = {
        "ema_alpha": 1.5,
        "consistency_weight": -1,
        "min_update_threshold": -0.1,
        "ilora_buffer_size": -1,
        "ilora_eval_adapter": "plastic",
        "hidden_state_layers": "last",
        "ilora_replay_batch_size": 0,
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError) as err:
            parse_config({**base, "cl_method": "ilora", key: value})
        assert err.value.field == key
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "cl_method": "ilora", "ema_alpha": -0.01})
    assert err.value.field == "ema_alpha"
    # EasyCL's example configs set ema_adapter_path for the first task too: a note, not an error.
    with caplog.at_level(logging.WARNING, logger="retain"):
        ILORA(parse_config({**base, "cl_method": "ilora", "ema_adapter_path": "x"}))
    assert "'ema_adapter_path' is not used" in caplog.text
    with pytest.raises(ConfigError, match="belongs to method 'ilora'"):
        parse_config({**base, "cl_method": "seq", "ema_alpha": 0.5})


# ---- buffer --------------------------------------------------------------------------------------------


def test_buffer_inclusion_is_uniform():
    # 2000 streams of 40 rows into a buffer of 8: each row is kept with probability 8/40.
    counts = Counter()
    for trial in range(2000):
        buffer = Buffer(8, seed=trial)
        for i in range(40):
            buffer.add({"input_ids": [i], "labels": [i]})
        assert len(buffer) == 8 and buffer.num_seen == 40
        counts.update(row["input_ids"][0] for row in buffer.rows)
    expected = 2000 * 8 / 40  # 400; binomial sd ~ 17.9
    assert all(abs(counts[i] - expected) < 90 for i in range(40)), counts
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(40))
    assert chi2 < 73  # df = 39: p(chi2 > 73) < 0.001


def test_buffer_variable_length_round_trip():
    rows = random_rows(5, seed=3)
    batch = pad_batch(rows, pad_id=0)
    buffer = Buffer(10, seed=0, pad_id=0)
    assert buffer.get_data(4) is None
    buffer.add_batch(batch)  # padded in, unpadded stored
    assert buffer.rows == rows
    data = buffer.get_data(5)
    widths = data["attention_mask"].sum(dim=1).tolist()
    got = sorted(
        (
            {"input_ids": i[:w], "labels": lab[:w]}
            for i, lab, w in zip(data["input_ids"].tolist(), data["labels"].tolist(), widths, strict=True)
        ),
        key=lambda r: r["input_ids"],
    )
    assert got == sorted(rows, key=lambda r: r["input_ids"])
    assert data["input_ids"].size(1) == max(len(r["input_ids"]) for r in rows)
    assert (data["labels"][data["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert len(buffer.get_data(2)["input_ids"]) == 2


def test_buffer_save_load_round_trip(tmp_path):
    buffer = Buffer(4, seed=1, pad_id=0)
    for row in random_rows(9, seed=5):
        buffer.add(row)
    buffer.save(tmp_path / BUFFER_FILE)
    saved_rows = list(buffer.rows)
    loaded = Buffer(4, seed=99)
    loaded.load(tmp_path / BUFFER_FILE)
    assert loaded.rows == buffer.rows and loaded.num_seen == 9
    # The random stream continues identically (same draws, same reservoir decisions).
    assert loaded.get_data(3)["input_ids"].tolist() == buffer.get_data(3)["input_ids"].tolist()
    extra = random_rows(3, seed=6)
    for row in extra:
        buffer.add(row)
        loaded.add(row)
    assert loaded.rows == buffer.rows
    # A smaller configured capacity keeps a subsample of the saved rows.
    small = Buffer(2)
    small.load(tmp_path / BUFFER_FILE)
    assert small.capacity == 2 and len(small) == 2 and all(r in saved_rows for r in small.rows)
    assert small.rows[0] != small.rows[1]


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
