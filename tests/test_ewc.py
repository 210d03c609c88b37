"""EWC: the penalty and the Fisher against hand computations, the step under accumulation, and runs."""

import logging
import random
import shutil
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from retain.cl.ewc import EWCArguments
from retain.cl.ewc.method import (
    ANCHOR_PREFIX,
    EWC,
    FISHER_PREFIX,
    STATE_FILE,
    accumulate_fisher,
    ewc_penalty,
    fisher_row_indices,
    squared_gradient_mean,
)
from retain.cl.loss import LossScale, causal_lm_loss
from retain.cl.registry import parse_config
from retain.data.prompt import IGNORE_INDEX, pad_batch
from retain.errors import ConfigError, ModelError
from retain.model.adapters import adapter_parameters
from retain.training.sequence import Session
from tests import step_helpers
from tests.run_helpers import log_entries, two_task_values
from tests.step_helpers import label_count, random_rows

# ---- helpers -------------------------------------------------------------------------------------------


def snapshot(model, name="default"):
    return {k: v.detach().clone() for k, v in adapter_parameters(model, name).items()}


@torch.no_grad()
def perturb(model, seed, scale=0.1, name="default"):
    """Move every LoRA tensor (lora_B starts at 0, which would zero lora_A's gradient)."""
    gen = torch.Generator().manual_seed(seed)
    for param in adapter_parameters(model, name).values():
        param.add_(scale * torch.randn(param.shape, generator=gen))


def bare_method(tiny_config, **overrides):
    """A EWC instance wrapping the tiny model, without a session (for step-level checks)."""
    values = {"cl_method": "ewc", "cl_tasks": "task0", "lora_dropout": 0.0, **overrides}
    return step_helpers.bare_method(EWC, tiny_config(**values))


def saved_state(path):
    tensors = load_file(str(path))
    fisher = {k[len(FISHER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(FISHER_PREFIX)}
    anchor = {k[len(ANCHOR_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ANCHOR_PREFIX)}
    return fisher, anchor


# ---- pure math -----------------------------------------------------------------------------------------


def test_penalty_and_its_gradient_by_hand():
    theta = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[0.5]], requires_grad=True)]
    fisher = [torch.tensor([0.1, 0.2]), torch.tensor([[4.0]])]
    anchor = [torch.tensor([0.0, 1.0]), torch.tensor([[1.0]])]
    penalty = ewc_penalty(theta, fisher, anchor, weight=3.0)
    # 3/2 * (0.1 * 1^2 + 0.2 * 1^2 + 4 * 0.5^2) = 1.5 * 1.3
    assert penalty.item() == pytest.approx(1.95, rel=1e-6)
    penalty.backward()
    # d/dtheta = weight * F * (theta - theta*)
    torch.testing.assert_close(theta[0].grad, torch.tensor([0.3, 0.6]))
    torch.testing.assert_close(theta[1].grad, torch.tensor([[-6.0]]))
    assert ewc_penalty(theta, fisher, [t.detach() for t in theta], weight=3.0).item() == 0.0


def test_fisher_mean_and_online_accumulation_by_hand():
    rows = [
        [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])],
        [torch.tensor([3.0, 0.0]), torch.tensor([[1.5]])],
    ]
    fisher = squared_gradient_mean(rows)
    torch.testing.assert_close(fisher[0], torch.tensor([5.0, 2.0]))  # (1 + 9) / 2, (4 + 0) / 2
    torch.testing.assert_close(fisher[1], torch.tensor([[1.25]]))  # (0.25 + 2.25) / 2
    assert fisher[0].dtype == torch.float32
    with pytest.raises(ValueError):
        squared_gradient_mean([])

    first = accumulate_fisher(None, fisher, gamma=0.5)
    assert first[0] is not fisher[0]  # a copy: later updates do not alias the task's Fisher
    torch.testing.assert_close(first[0], fisher[0])
    later = accumulate_fisher([torch.tensor([1.0, 1.0])], [torch.tensor([5.0, 2.0])], gamma=0.5)
    torch.testing.assert_close(later[0], torch.tensor([5.5, 2.5]))  # 0.5 * 1 + 5, 0.5 * 1 + 2
    summed = accumulate_fisher([torch.tensor([1.0, 1.0])], [torch.tensor([5.0, 2.0])], gamma=1.0)
    torch.testing.assert_close(summed[0], torch.tensor([6.0, 3.0]))


def test_fisher_rows_are_seeded_distinct_and_leave_the_global_rng_alone():
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    picked = fisher_row_indices(50, 10, seed=3, task_name="a")
    assert picked == sorted(set(picked)) and len(picked) == 10 and all(0 <= i < 50 for i in picked)
    assert picked == fisher_row_indices(50, 10, seed=3, task_name="a")
    assert picked != fisher_row_indices(50, 10, seed=3, task_name="b")
    assert picked != fisher_row_indices(50, 10, seed=4, task_name="a")
    assert fisher_row_indices(6, 100, seed=3, task_name="a") == list(range(6))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_arguments_defaults_and_checks(caplog):
    args = EWCArguments()
    assert (args.ewc_lambda, args.ewc_num_samples, args.ewc_gamma) == (10000.0, 100, 1.0)
    for key, value in (("ewc_lambda", -1.0), ("ewc_num_samples", 0), ("ewc_gamma", 1.5), ("ewc_gamma", -0.1)):
        with pytest.raises(ConfigError) as info:
            EWCArguments(**{key: value})
        assert info.value.field == key
    config = parse_config({"model_name_or_path": "tiny-random-llama", "cl_tasks": "a", "use_ewc": True})
    assert config.cl.cl_method == "ewc"
    with pytest.raises(ConfigError) as info:
        parse_config({"model_name_or_path": "x", "cl_tasks": "a", "cl_method": "seq", "ewc_lambda": 1.0})
    assert info.value.field == "ewc_lambda"
    # EasyCL's single-task configs name the previous task's data: accepted, with a note that it is not used.
    easycl = parse_config(
        {"model_name_or_path": "x", "cl_tasks": "a", "use_ewc": True, "previous_task_data": "data/prev"}
    )
    with caplog.at_level(logging.WARNING):
        EWC(easycl)
    assert "'previous_task_data' is not used" in caplog.text


# ---- the Fisher pass and the step on the tiny model ---------------------------------------------------


def test_fisher_on_the_tiny_model_by_hand(tiny_config):
    # LoRA dropout 0.5: the Fisher pass must run without it (eval mode), so it is deterministic.
    method, model, tokenizer = bare_method(tiny_config, lora_dropout=0.5)
    perturb(model, seed=1)
    rows = random_rows(5, seed=2)
    params = method.params
    model.train()
    rng_before = torch.get_rng_state()
    fisher = method.task_fisher(model, rows)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.training and all(m.training for m in model.modules()), "train mode must be restored"
    assert all(p.grad is None for p in params), "the Fisher pass must leave no gradient behind"
    assert len(fisher) == len(params) and all(f.dtype == torch.float32 for f in fisher)

    # By hand: each row's mean answer-token loss from the full logits, its gradient, squared, averaged.
    model.eval()
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for row in rows:
        batch = pad_batch([row], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        loss = F.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=IGNORE_INDEX)
        for e, g in zip(expected, torch.autograd.grad(loss, params), strict=True):
            e.add_(g.square())
    expected = [e / len(rows) for e in expected]
    model.train()
    for got, want in zip(fisher, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-4)
    assert all(f.sum() > 0 for f in fisher), "every LoRA tensor must get some Fisher mass"
    again = method.task_fisher(model, rows)
    assert all(torch.equal(a, b) for a, b in zip(again, fisher, strict=True))


def test_step_loss_is_ce_plus_penalty_once_per_step(tiny_config):
    method, model, tokenizer = bare_method(tiny_config, ewc_lambda=50.0)
    perturb(model, seed=3)
    gen = torch.Generator().manual_seed(4)
    method.fisher = [torch.rand(p.shape, generator=gen) for p in method.params]
    method.anchor = [p.detach().float() + 0.2 * torch.randn(p.shape, generator=gen) for p in method.params]
    model.train()
    rows = random_rows(8, seed=5)
    batch = pad_batch(rows, tokenizer.pad_token_id)

    loss = method.compute_loss(model, batch, LossScale(num_items=label_count(batch)))
    loss.backward()
    grads_one = [p.grad.clone() for p in method.params]
    model.zero_grad()
    with torch.no_grad():
        ce = causal_lm_loss(model, batch, LossScale(num_items=None))
        penalty = ewc_penalty(method.params, method.fisher, method.anchor, 50.0)
    assert penalty.item() > 0.1 * ce.item()
    torch.testing.assert_close(loss.detach(), ce + penalty, atol=1e-5, rtol=1e-5)

    # The same step as 4 micro-batches of 2 rows: the penalty is added once in total.
    total = 0.0
    for i in range(0, 8, 2):
        part = pad_batch(rows[i : i + 2], tokenizer.pad_token_id)
        part_loss = method.compute_loss(
            model, part, LossScale(num_items=label_count(batch), accumulation_steps=4)
        )
        part_loss.backward()
        total = total + part_loss.detach()
    torch.testing.assert_close(total, loss.detach(), atol=1e-5, rtol=1e-5)
    for p, g in zip(method.params, grads_one, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
    model.zero_grad()

    # Outside training (evaluation loss) and before any task is consolidated: plain CE.
    model.eval()
    torch.testing.assert_close(
        method.compute_loss(model, batch, LossScale(num_items=None)),
        causal_lm_loss(model, batch, LossScale(None)),
    )
    model.train()
    method.fisher = method.anchor = None
    torch.testing.assert_close(
        method.compute_loss(model, batch, LossScale(num_items=None)),
        causal_lm_loss(model, batch, LossScale(None)),
    )


def test_gradient_accumulation_gives_the_same_step(tiny_config, tmp_path):
    """A whole trainer step, 8 rows x 1 against 2 rows x 4, with a penalty active from the first step."""

    def one_step(batch, accumulation):
        config = parse_config(
            tiny_config(
                cl_method="ewc",
                cl_tasks="task0",
                max_samples=8,
                lora_dropout=0.0,
                ewc_lambda=100.0,
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
        begin = method.begin_task
        start = {}

        def begin_task(model, task, data):
            begin(model, task, data)
            gen = torch.Generator().manual_seed(6)
            method.fisher = [0.01 * torch.rand(p.shape, generator=gen) for p in method.params]
            method.anchor = [
                p.detach().float() + 0.1 * torch.randn(p.shape, generator=gen) for p in method.params
            ]
            start["penalty"] = ewc_penalty(method.params, method.fisher, method.anchor, 100.0).item()

        method.begin_task = begin_task
        session.train_task(session.tasks[0], session.data[0])
        (entry,) = log_entries(session.run_dir, 1)
        return entry, start["penalty"], snapshot(session.model)

    entry1, penalty, weights1 = one_step(batch=8, accumulation=1)
    entry4, _, weights4 = one_step(batch=2, accumulation=4)
    assert penalty > 1e-3
    for entry in (entry1, entry4):
        assert entry["loss_ewc"] == pytest.approx(penalty, rel=1e-5)
        assert entry["loss"] == pytest.approx(entry["loss_ce"] + entry["loss_ewc"], rel=1e-6)
    assert entry4["loss"] == pytest.approx(entry1["loss"], abs=1e-5)
    # SGD: the update is proportional to the gradient, so a mis-scaled penalty would show here.
    for k in weights1:
        torch.testing.assert_close(weights4[k], weights1[k], atol=1e-6, rtol=0)


# ---- runs ----------------------------------------------------------------------------------------------


run_values = partial(two_task_values, lora_dropout=0.1)


def weighted_drift(run_dir):
    """sum F_1 (theta_2 - theta_1)^2: how far task 2 moved the weights that matter for task 1."""
    fisher, anchor = saved_state(run_dir / "task_1" / STATE_FILE)
    _, after = saved_state(run_dir / "task_2" / STATE_FILE)
    return sum(float((fisher[k] * (after[k] - anchor[k]).square()).sum()) for k in fisher)


def test_lambda_zero_is_exactly_seq_and_the_penalty_holds_the_weights(tiny_config, learnable_dir, tmp_path):
    runs = {}
    for name, overrides in (
        ("seq", {"cl_method": "seq"}),
        ("ewc0", {"cl_method": "ewc", "ewc_lambda": 0.0}),
        ("ewc", {"cl_method": "ewc"}),
    ):
        session = Session(parse_config(run_values(tiny_config, learnable_dir, tmp_path, name, **overrides)))
        runs[name] = (session, session.run())

    (seq, seq_metrics), (ewc0, ewc0_metrics) = runs["seq"], runs["ewc0"]
    # Computing the Fisher after each task changes nothing that later tasks train on.
    assert ewc0.method.fisher is not None and sum(float(f.sum()) for f in ewc0.method.fisher) > 0
    assert ewc0_metrics["matrix"] == seq_metrics["matrix"]
    assert max(v for row in seq_metrics["matrix"] for v in row) > 0, "the tasks must be learned"
    seq_weights, ewc0_weights = snapshot(seq.model), snapshot(ewc0.model)
    assert all(torch.equal(ewc0_weights[k], seq_weights[k]) for k in seq_weights)
    assert [e["loss"] for e in log_entries(tmp_path / "ewc0", 2)] == [
        e["loss"] for e in log_entries(tmp_path / "seq", 2)
    ]

    # With the default weight, task 2 moves the weights that matter for task 1 much less.
    held, free = weighted_drift(tmp_path / "ewc"), weighted_drift(tmp_path / "ewc0")
    assert free > 0 and held < 0.5 * free
    task1 = log_entries(tmp_path / "ewc", 1)
    task2 = log_entries(tmp_path / "ewc", 2)
    assert all(e["loss_ewc"] == 0.0 for e in task1)
    assert task2[0]["loss_ewc"] == 0.0  # the first step of task 2 starts at theta*
    assert all(e["loss_ewc"] > 0 for e in task2[1:])
    for entry in task1 + task2:
        assert entry["loss"] == pytest.approx(entry["loss_ce"] + entry["loss_ewc"], rel=1e-5)


def test_state_accumulates_is_saved_and_continues_in_a_new_process(tiny_config, learnable_dir, tmp_path):
    values = run_values(
        tiny_config,
        learnable_dir,
        tmp_path,
        "run",
        cl_method="ewc",
        cl_tasks="task0,task1,task2",
        ewc_gamma=0.5,
    )
    session = Session(parse_config(values))
    task_fishers = {}
    task_fisher = session.method.task_fisher

    def recording(model, rows):
        result = task_fisher(model, rows)
        task_fishers[len(task_fishers) + 1] = [f.clone() for f in result]
        assert len(rows) == 16  # every train row of the task (fewer than ewc_num_samples)
        return result

    session.method.task_fisher = recording
    metrics = session.run()
    out = tmp_path / "run"
    assert (out / "metrics.json").is_file() and len(metrics["matrix"]) == 4
    keys = session.method.keys
    running = None
    for task_id in (1, 2, 3):
        fisher, anchor = saved_state(out / f"task_{task_id}" / STATE_FILE)
        assert sorted(fisher) == sorted(anchor) == keys
        # F_k = 0.5 * F_(k-1) + F_task_k
        current = dict(zip(keys, task_fishers[task_id], strict=True))
        running = current if running is None else {k: 0.5 * running[k] + current[k] for k in keys}
        for k in keys:
            torch.testing.assert_close(fisher[k], running[k], atol=0, rtol=1e-6)
        # theta* is the adapter saved with the task.
        adapter = load_file(str(out / f"task_{task_id}" / "adapter" / "adapter_model.safetensors"))
        assert adapter.keys() == anchor.keys()
        assert all(torch.equal(anchor[k], adapter[k].float()) for k in keys)

    # A new process restores task 2's state exactly.
    later = Session(parse_config(values))
    later.load()
    later.restore(2)
    fisher2, anchor2 = saved_state(out / "task_2" / STATE_FILE)
    assert all(torch.equal(f, fisher2[k]) for f, k in zip(later.method.fisher, keys, strict=True))
    assert all(torch.equal(a, anchor2[k]) for a, k in zip(later.method.anchor, keys, strict=True))

    # One command per task: task 3 continued from the saved task 2 trains exactly as in one run.
    continued_values = {
        **values,
        "cl_tasks": "task2",
        "previous_task_model": str(out / "task_2"),
        "current_task_id": 3,
        "output_dir": str(tmp_path / "continued"),
    }
    Session(parse_config(continued_values)).run(train=True, evaluate=False)
    fisher_a, anchor_a = saved_state(out / "task_3" / STATE_FILE)
    fisher_b, anchor_b = saved_state(tmp_path / "continued" / "task_3" / STATE_FILE)
    for k in keys:
        assert torch.equal(fisher_b[k], fisher_a[k]) and torch.equal(anchor_b[k], anchor_a[k])

    # A task directory without EWC state (e.g. from a seq run) is a clear error naming the file.
    plain = tmp_path / "plain_task"
    shutil.copytree(out / "task_1", plain)
    (plain / STATE_FILE).unlink()
    broken = Session(
        parse_config(
            {**continued_values, "previous_task_model": str(plain), "output_dir": str(tmp_path / "broken")}
        )
    )
    broken.load()
    with pytest.raises(ModelError, match="EWC state not found") as info:
        broken.restore(0)
    assert info.value.source.endswith(STATE_FILE)
