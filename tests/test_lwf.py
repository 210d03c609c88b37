"""LwF: the KL term against hand computations, the teacher pass, the step under accumulation, and runs."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from retain.cl.base import Task
from retain.cl.loss import LossScale, causal_lm_loss, shifted_targets
from retain.cl.lwf import LwFArguments
from retain.cl.lwf.method import TEACHER, LwF, distillation_kl_sum, lwf_terms
from retain.cl.registry import parse_config
from retain.data.prompt import IGNORE_INDEX, pad_batch
from retain.errors import ConfigError
from retain.model.adapters import adapter_parameters, use_adapter
from retain.training.sequence import Session
from tests import step_helpers
from tests.run_helpers import log_entries, two_task_values
from tests.step_helpers import label_count, random_rows

# ---- helpers -------------------------------------------------------------------------------------------


def snapshot(model, name="default"):
    return {k: v.detach().clone() for k, v in adapter_parameters(model, name).items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def perturb(model, name, seed, scale=0.2):
    gen = torch.Generator().manual_seed(seed)
    for param in adapter_parameters(model, name).values():
        param.add_(scale * torch.randn(param.shape, generator=gen))


def bare_method(tiny_config, **overrides):
    """A LwF instance wrapping the tiny model, without a session (for step-level checks)."""
    values = {"cl_method": "lwf", "cl_tasks": "task0", "lora_dropout": 0.0, **overrides}
    return step_helpers.bare_method(LwF, tiny_config(**values))


# ---- pure math -----------------------------------------------------------------------------------------


def test_kl_term_by_hand():
    t = 2.0
    # Row 0: position 0 counts: teacher softmax([0, 0]/2) = [1/2, 1/2], student softmax([2 ln 3, 0]/2) =
    # [3/4, 1/4]. Position 1 is ignored (its target is IGNORE_INDEX) and has very different logits.
    # Row 1: position 0 is ignored; position 1: teacher [ln 4, 0]*2 -> [4/5, 1/5], student [0, 0] -> [1/2, 1/2].
    student = torch.tensor([[[2 * math.log(3), 0.0], [9.0, -9.0]], [[5.0, 1.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [-9.0, 9.0]], [[-3.0, 2.0], [2 * math.log(4), 0.0]]])
    targets = torch.tensor([[1, IGNORE_INDEX], [IGNORE_INDEX, 0]])
    first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 * ln(4/3)
    second = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    got = distillation_kl_sum(student, teacher, targets, t)
    assert got.item() == pytest.approx(first + second, rel=1e-6)
    # KL(old || new), not the reverse: the reverse of the first position is 0.75 ln 1.5 + 0.25 ln 0.5.
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert abs(first - reverse) > 1e-3
    assert distillation_kl_sum(student[:1], teacher[:1], targets[:1], t).item() == pytest.approx(
        first, rel=1e-6
    )
    assert distillation_kl_sum(teacher, teacher, targets, t).item() == pytest.approx(0.0, abs=1e-7)
    # The terms: (1 - a) * CE and a * T^2 * KL.
    ce_term, kl_term = lwf_terms(torch.tensor(2.0), torch.tensor(0.5), alpha=0.25, temperature=2.0)
    assert ce_term.item() == pytest.approx(1.5) and kl_term.item() == pytest.approx(0.5)


def test_arguments_defaults_and_checks():
    args = LwFArguments()
    assert (args.lwf_temperature, args.lwf_alpha) == (2.0, 0.5)
    for key, value in (
        ("lwf_temperature", 0.0),
        ("lwf_temperature", -1.0),
        ("lwf_alpha", 1.5),
        ("lwf_alpha", -0.1),
    ):
        with pytest.raises(ConfigError) as info:
            LwFArguments(**{key: value})
        assert info.value.field == key
    config = parse_config({"model_name_or_path": "tiny-random-llama", "cl_tasks": "a", "use_lwf": True})
    assert config.cl.cl_method == "lwf"


# ---- the teacher and the step on the tiny model ------------------------------------------------------


def test_teacher_is_a_frozen_copy_that_runs_without_dropout(tiny_config):
    method, model, tokenizer = bare_method(tiny_config, lora_dropout=0.5)
    default, teacher = adapter_parameters(model, "default"), adapter_parameters(model, TEACHER)
    assert same(snapshot(model), snapshot(model, TEACHER))
    assert all(p.requires_grad for p in default.values()) and not any(
        p.requires_grad for p in teacher.values()
    )
    perturb(model, TEACHER, seed=1)
    batch = pad_batch(random_rows(3, seed=2), tokenizer.pad_token_id)
    keep, _ = shifted_targets(batch["labels"])
    model.train()
    rng_before = torch.get_rng_state()
    got = method.teacher_logits(batch, keep)
    again = method.teacher_logits(batch, keep)
    assert torch.equal(got, again), "no dropout in the teacher pass"
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not got.requires_grad
    assert model.training and all(m.training for m in model.modules()), "train mode must be restored"
    assert model.active_adapter == "default"
    with torch.no_grad(), use_adapter(model, TEACHER):
        model.eval()
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, keep]
        model.train()
    torch.testing.assert_close(got, expected)
    # begin_task: the first task has no teacher; later ones copy `default` into it, flags unchanged.
    method.begin_task(model, Task(0, "a"), None)
    assert not method.has_teacher and not same(snapshot(model), snapshot(model, TEACHER))
    method.begin_task(model, Task(1, "b"), None)
    assert method.has_teacher and same(snapshot(model), snapshot(model, TEACHER))
    assert all(p.requires_grad for p in default.values()) and not any(
        p.requires_grad for p in teacher.values()
    )


def test_step_loss_is_the_composition_and_invariant_to_accumulation(tiny_config):
    method, model, tokenizer = bare_method(tiny_config, lwf_alpha=0.3, lwf_temperature=2.0)
    method.begin_task(model, Task(1, "b"), None)
    perturb(model, TEACHER, seed=3)
    model.train()
    rows = random_rows(8, seed=4)
    batch = pad_batch(rows, tokenizer.pad_token_id)

    loss = method.compute_loss(model, batch, LossScale(num_items=label_count(batch)))
    loss.backward()
    grads_one = {k: p.grad.clone() for k, p in adapter_parameters(model, "default").items()}
    assert all(p.grad is None for p in adapter_parameters(model, TEACHER).values())
    model.zero_grad()

    # By hand, with full-logit forward passes: token means over every answer token of the batch.
    with torch.no_grad():
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        with use_adapter(model, TEACHER):
            old = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        ce = F.cross_entropy(student[mask], targets[mask])
        p_old = F.softmax(old[mask] / 2.0, dim=-1)
        kl = (p_old * (p_old.log() - F.log_softmax(student[mask] / 2.0, dim=-1))).sum(-1).mean()
    assert kl.item() > 1e-3
    torch.testing.assert_close(loss.detach(), 0.7 * ce + 0.3 * 4.0 * kl, atol=1e-5, rtol=1e-5)

    # The same step as 4 micro-batches of 2 rows: same total, same gradient.
    total = 0.0
    for i in range(0, 8, 2):
        part = pad_batch(rows[i : i + 2], tokenizer.pad_token_id)
        part_loss = method.compute_loss(
            model, part, LossScale(num_items=label_count(batch), accumulation_steps=4)
        )
        part_loss.backward()
        total = total + part_loss.detach()
    torch.testing.assert_close(total, loss.detach(), atol=1e-5, rtol=1e-5)
    for k, p in adapter_parameters(model, "default").items():
        torch.testing.assert_close(p.grad, grads_one[k], atol=1e-6, rtol=1e-4)
    model.zero_grad()

    # No teacher (first task), alpha 0, or outside training: plain CE and no teacher pass.
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher pass must be skipped")

    method.teacher_logits = no_teacher
    plain = causal_lm_loss(model, batch, LossScale(num_items=label_count(batch)))
    model.eval()
    torch.testing.assert_close(
        method.compute_loss(model, batch, LossScale(num_items=label_count(batch))), plain
    )
    model.train()
    method.args.lwf_alpha = 0.0
    assert torch.equal(method.compute_loss(model, batch, LossScale(num_items=label_count(batch))), plain)
    method.args.lwf_alpha = 0.3
    method.begin_task(model, Task(0, "a"), None)
    assert torch.equal(method.compute_loss(model, batch, LossScale(num_items=label_count(batch))), plain)


# ---- runs ----------------------------------------------------------------------------------------------


class TeacherCheck(TrainerCallback):
    """Before every optimizer step: the teacher has no gradient, does not require one, is not optimised."""

    def __init__(self):
        self.checks = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        teacher = adapter_parameters(model, TEACHER).values()
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert all(p.grad is None and not p.requires_grad and id(p) not in optimised for p in teacher)
        assert all(p.grad is not None for p in adapter_parameters(model, "default").values())
        self.checks += 1


run_values = partial(two_task_values, lora_dropout=0.1)


@torch.no_grad()
def mean_kl_to_teacher(session, rows):
    """Mean over answer tokens of KL(teacher || default) at T = 2, the trained temperature (eval mode)."""
    method, model = session.method, session.model
    model.eval()
    batch = pad_batch(rows, session.tokenizer.pad_token_id)
    keep, targets = shifted_targets(batch["labels"])
    student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, keep]
    total = distillation_kl_sum(student, method.teacher_logits(batch, keep), targets, 2.0)
    return total.item() / int((targets != IGNORE_INDEX).sum())


def test_alpha_zero_is_exactly_seq_and_distillation_keeps_the_old_outputs(
    tiny_config, learnable_dir, tmp_path
):
    runs = {}
    for name, overrides in (
        ("seq", {"cl_method": "seq"}),
        ("lwf0", {"cl_method": "lwf", "lwf_alpha": 0.0}),
        ("lwf", {"cl_method": "lwf", "lwf_alpha": 0.9}),
    ):
        session = Session(parse_config(run_values(tiny_config, learnable_dir, tmp_path, name, **overrides)))
        check, starts, ends = TeacherCheck(), {}, {}
        if name != "seq":
            begin, end, callbacks = (
                session.method.begin_task,
                session.method.end_task,
                session.method.callbacks,
            )

            def begin_task(model, task, data, begin=begin, starts=starts):
                starts[task.id] = snapshot(model)
                begin(model, task, data)

            def end_task(model, task, data, end=end, ends=ends):
                ends[task.id] = (snapshot(model), snapshot(model, TEACHER))
                end(model, task, data)

            session.method.begin_task, session.method.end_task = begin_task, end_task
            session.method.callbacks = lambda model, callbacks=callbacks, check=check: [
                *callbacks(model),
                check,
            ]
        runs[name] = (session, session.run(), check, starts, ends)

    seq, seq_metrics = runs["seq"][:2]
    lwf0, lwf0_metrics = runs["lwf0"][:2]
    assert lwf0_metrics["matrix"] == seq_metrics["matrix"]
    assert max(v for row in seq_metrics["matrix"] for v in row) > 0, "the tasks must be learned"
    assert same(snapshot(lwf0.model), snapshot(seq.model))
    assert [e["loss"] for e in log_entries(tmp_path / "lwf0", 2)] == [
        e["loss"] for e in log_entries(tmp_path / "seq", 2)
    ]

    session, _, check, starts, ends = runs["lwf"]
    assert check.checks == 16  # 2 tasks x 2 epochs x 4 steps, every one checked
    # Task 2's teacher is the adapter after task 1, and stays frozen through task 2.
    after_task1 = ends[1][0]
    assert same(starts[2], after_task1)
    assert same(ends[2][1], after_task1)
    assert not same(ends[2][0], after_task1)
    # The distillation is logged separately: 0 in task 1 (no teacher), > 0 in task 2 (from the first
    # step on: the student's LoRA dropout already moves it away from the teacher).
    task1, task2 = log_entries(tmp_path / "lwf", 1), log_entries(tmp_path / "lwf", 2)
    assert all(e["loss_kl"] == 0.0 for e in task1)
    assert all(e["loss_kl"] > 0 for e in task2)
    for entry in task1 + task2:
        assert entry["loss"] == pytest.approx(entry["loss_ce"] + entry["loss_kl"], rel=1e-5)
    # With alpha 0.9 the outputs on task 2's rows stay closer to the teacher's than without LwF. Not
    # by a large factor in 8 Adam steps: Adam's step size does not shrink with the CE weight, and the
    # KL term pulls back only once the student has moved (here about 0.6 of the free run's KL).
    rows = session.data[1].train_rows
    held, free = mean_kl_to_teacher(session, rows), mean_kl_to_teacher(lwf0, rows)
    assert free > 0 and held < 0.8 * free


def test_previous_task_model_sets_the_teacher(tiny_config, learnable_dir, tmp_path):
    first = Session(
        parse_config(run_values(tiny_config, learnable_dir, tmp_path, "a", cl_method="lwf", cl_tasks="task0"))
    )
    first.run(train=True, evaluate=False)
    trained = snapshot(first.model)
    later = Session(
        parse_config(
            run_values(
                tiny_config,
                learnable_dir,
                tmp_path,
                "b",
                cl_method="lwf",
                cl_tasks="task1",
                previous_task_model=str(tmp_path / "a" / "task_1"),
                current_task_id=2,
            )
        )
    )
    later.load()
    later.restore(0)
    later.method.begin_task(later.model, later.tasks[0], later.data[0])
    assert later.method.has_teacher
    assert same(snapshot(later.model), trained) and same(snapshot(later.model, TEACHER), trained)
    assert not any(p.requires_grad for p in adapter_parameters(later.model, TEACHER).values())
