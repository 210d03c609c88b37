"""The projection machinery GEM and A-GEM share: the dual solver against brute force, the memories and
the seeded draws, the reference gradients on the tiny model, and the projected step under accumulation."""

import itertools
import json
import random
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from retain.cl.gem.method import GEM
from retain.cl.loss import causal_lm_sums
from retain.cl.projection.math import (
    agem_project,
    clip_to_norm,
    gem_project,
    gram_and_dots,
    solve_nonnegative_dual,
)
from retain.cl.projection.memory import (
    draw_per_task,
    draw_pooled,
    reservoir_sample,
    step_rng,
)
from retain.cl.registry import parse_config
from retain.data.prompt import IGNORE_INDEX, pad_batch
from retain.model.adapters import adapter_parameters
from retain.training.sequence import Session
from tests import step_helpers
from tests.run_helpers import two_task_values
from tests.step_helpers import random_rows


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---- the dual solver ----------------------------------------------------------------------------------


def brute_force_dual(P, c):
    """Every active set: the u >= 0 with P_SS u_S = -c_S whose multipliers P u + c are >= 0 (KKT)."""
    k = c.numel()
    tol = 1e-9 * max(float(P.abs().max()), float(c.abs().max()), 1.0)
    for size in range(k + 1):
        for subset in itertools.combinations(range(k), size):
            u = torch.zeros(k, dtype=torch.float64)
            if subset:
                index = torch.tensor(subset)
                u[index] = torch.linalg.lstsq(P[index][:, index], -c[index].unsqueeze(1)).solution.squeeze(1)
            if bool((u >= -tol).all()) and bool((P @ u + c >= -tol).all()):
                return u.clamp(min=0)
    raise AssertionError("no KKT point")


def test_dual_solver_matches_brute_force_and_kkt_on_random_problems():
    gen = torch.Generator().manual_seed(0)
    projected = 0
    for trial in range(300):
        k = 1 + trial % 5
        p = 1 + (trial * 7) % 9
        refs = torch.randn(k, p, generator=gen, dtype=torch.float64)
        if trial % 4 == 0 and k > 1:
            refs[-1] = 2.0 * refs[0]  # linearly dependent constraints
        g = torch.randn(p, generator=gen, dtype=torch.float64)
        margin = [0.0, 0.5, 1.0][trial % 3]
        P, c = gram_and_dots(refs, g)
        shifted = c + margin * P.sum(dim=1)
        u = solve_nonnegative_dual(P, shifted)
        scale = max(float(P.abs().max()), float(c.abs().max()), 1.0)
        multipliers = P @ u + shifted
        assert bool((u >= 0).all()) and bool((multipliers >= -1e-9 * scale).all())
        assert float((u * multipliers).abs().max()) <= 1e-9 * scale**2
        # The primal point is unique, so every KKT solution of the dual gives the same g~.
        reference = brute_force_dual(P, shifted)
        torch.testing.assert_close(refs.T @ u, refs.T @ reference, atol=1e-8 * scale, rtol=1e-8)
        result = gem_project(g, refs, margin)
        assert bool((refs @ result.grad >= -1e-9 * scale).all()), "every constraint must hold"
        if result.projected:
            projected += 1
            expected = g + refs.T @ (u + margin)
            torch.testing.assert_close(result.grad, expected, atol=1e-9 * scale, rtol=1e-9)
            # The margin's meaning: the plain projection of g + margin * sum_k g_k.
            plain = gem_project(g + margin * refs.sum(dim=0), refs, 0.0)
            torch.testing.assert_close(result.grad, plain.grad, atol=1e-9 * scale, rtol=1e-9)
            assert result.violated == int((refs @ g < 0).sum())
        else:
            assert result.grad is g
    assert projected > 100


def test_projection_is_the_closest_feasible_point_without_margin():
    gen = torch.Generator().manual_seed(1)
    refs = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    g = -refs.sum(dim=0) + 0.1 * torch.randn(6, generator=gen, dtype=torch.float64)
    result = gem_project(g, refs, 0.0)
    assert result.projected
    best = float((result.grad - g).norm())
    for _ in range(2000):  # random feasible points are never closer
        y = result.grad + 0.5 * torch.randn(6, generator=gen, dtype=torch.float64)
        if bool((refs @ y >= 0).all()):
            assert float((y - g).norm()) >= best - 1e-12


def test_float32_gradients_stay_float32_and_are_combined_in_float64():
    g = torch.tensor([1.0, -1.0], dtype=torch.float32)
    result = gem_project(g, torch.tensor([[0.0, 1.0]], dtype=torch.float32), 0.0)
    assert result.grad.dtype == torch.float32
    torch.testing.assert_close(result.grad, torch.tensor([1.0, 0.0]))


def test_clip_to_norm_is_the_trainers_rule():
    g = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(clip_to_norm(g, 1.0), g * (1.0 / (5.0 + 1e-6)))
    assert clip_to_norm(g, 10.0) is g and clip_to_norm(g, 0.0) is g


def test_agem_and_gem_agree_on_one_constraint_without_margin():
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        g, r = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
        a, b = agem_project(g, r), gem_project(g, r.unsqueeze(0), 0.0)
        assert a.projected == b.projected
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


# ---- memories and draws ------------------------------------------------------------------------------


def rows_numbered(n):
    return [{"input_ids": [i], "labels": [i]} for i in range(n)]


def test_reservoir_memory_is_uniform_seeded_and_leaves_the_global_rng_alone():
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    rows = rows_numbered(10)
    counts = [0] * 10
    draws = 3000
    for seed in range(draws):
        kept = reservoir_sample(rows, 3, random.Random(seed))
        ids = [row["input_ids"][0] for row in kept]
        assert len(ids) == 3 == len(set(ids))
        for i in ids:
            counts[i] += 1
    # Each row is kept with probability 3/10: 900 of 3000 expected, sd 25; allow 4 sd.
    assert all(abs(c - 900) < 100 for c in counts), counts
    assert reservoir_sample(rows, 3, random.Random(7)) == reservoir_sample(rows, 3, random.Random(7))
    assert reservoir_sample(rows, 20, random.Random(7)) == rows  # fewer rows than slots: all, in order
    assert reservoir_sample(rows, 0, random.Random(7)) == []
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_reference_draws_are_seeded_by_step_and_come_from_the_right_memories():
    groups = {"a": rows_numbered(10), "b": [{"input_ids": [100 + i], "labels": [0]} for i in range(4)]}
    per_task = draw_per_task(groups, ["a", "b"], 6, step_rng(0, "gem", "c", 3))
    assert [len(rows) for rows in per_task] == [6, 4]  # b has only 4 rows
    assert all(row["input_ids"][0] < 10 for row in per_task[0])
    assert all(row["input_ids"][0] >= 100 for row in per_task[1])
    assert per_task == draw_per_task(groups, ["a", "b"], 6, step_rng(0, "gem", "c", 3))
    assert per_task != draw_per_task(groups, ["a", "b"], 6, step_rng(0, "gem", "c", 4))
    assert draw_per_task(groups, ["b"], 6, step_rng(0, "gem", "c", 3))[0][0]["input_ids"][0] >= 100
    assert draw_per_task({**groups, "a": []}, ["a"], 6, step_rng(0, "gem", "c", 3)) == []
    pooled = draw_pooled(groups, ["a", "b"], 14, step_rng(0, "agem", "c", 0))
    assert sorted(row["input_ids"][0] for row in pooled) == list(range(10)) + [100, 101, 102, 103]
    seen = {
        row["input_ids"][0] >= 100
        for s in range(40)
        for row in draw_pooled(groups, ["a", "b"], 2, step_rng(0, "agem", "c", s))
    }
    assert seen == {True, False}, "pooled draws mix the tasks"


# ---- reference gradients and the step on the tiny model ------------------------------------------------


def bare_method(tiny_config, **overrides):
    """A GEM instance wrapping the tiny model, without a session (for step-level checks)."""
    values = {"cl_method": "gem", "cl_tasks": "task0", "lora_dropout": 0.0, **overrides}
    return step_helpers.bare_method(GEM, tiny_config(**values))


@torch.no_grad()
def perturb(model, seed, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    for param in adapter_parameters(model, "default").values():
        param.add_(scale * torch.randn(param.shape, generator=gen))


def step_args(**overrides):
    values = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "world_size": 1,
        "process_index": 0,
        "max_grad_norm": 0.0,
        "bf16": False,
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def hand_gradient(model, params, rows, pad_id):
    """The gradient of the rows' mean answer-token loss, from the full logits, all rows in one batch."""
    batch = pad_batch(rows, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_reference_gradient_by_hand_and_split_over_processes(tiny_config):
    # LoRA dropout 0.5: the reference pass must switch it off (deterministic) and restore train mode.
    method, model, tokenizer = bare_method(tiny_config, lora_dropout=0.5)
    perturb(model, seed=1)
    groups = [random_rows(5, seed=2), random_rows(3, seed=3)]
    model.train()
    rng_before = torch.get_rng_state()
    refs = method.reference_gradients(model, groups, step_args())  # micro-batches of 2, 2 and 1 rows
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(m.training for m in model.modules()), "train mode must be restored"
    assert all(p.grad is None for p in method.params), "no .grad may be written"
    assert refs.shape == (2, sum(p.numel() for p in method.params)) and refs.dtype == torch.float32

    model.eval()
    for got, rows in zip(refs, groups, strict=True):
        want = hand_gradient(model, method.params, rows, tokenizer.pad_token_id)
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)
    model.train()
    assert float(refs.abs().sum()) > 0

    # Two processes each take every other row and divide by the whole group's token count; the parts add
    # up to the one-process gradient (the all-reduce sums them).
    parts = [
        method.reference_gradients(model, groups, step_args(world_size=2, process_index=rank))
        for rank in (0, 1)
    ]
    torch.testing.assert_close(parts[0] + parts[1], refs, atol=1e-7, rtol=1e-5)
    assert not torch.equal(parts[0], refs)


def test_project_step_meets_every_constraint_and_equals_the_math(tiny_config):
    method, model, tokenizer = bare_method(tiny_config, gem_memory_strength=0.5)
    perturb(model, seed=4)
    method.memory.groups = {
        "a": random_rows(6, seed=5),
        "b": random_rows(6, seed=6),
        "now": random_rows(4, seed=7),
    }
    method.current = SimpleNamespace(name="now")
    assert method.earlier_tasks() == ["a", "b"]
    model.train()
    args = step_args(per_device_train_batch_size=4)
    step = 3
    drawn = draw_per_task(method.memory.groups, ["a", "b"], 4, method.draw_rng(step))
    model.eval()
    refs = torch.stack([hand_gradient(model, method.params, rows, tokenizer.pad_token_id) for rows in drawn])
    model.train()
    # A step gradient that conflicts with task a: minus its reference gradient plus a little of b's.
    proposed = -refs[0] + 0.1 * refs[1]
    assert float(proposed @ refs[0]) < 0
    start = 0
    for p in method.params:
        p.grad = proposed[start : start + p.numel()].view_as(p).clone()
        start += p.numel()

    method.project_step(model, args, step)
    applied = torch.cat([p.grad.reshape(-1) for p in method.params])
    expected = gem_project(proposed, refs, 0.5)
    assert expected.projected
    torch.testing.assert_close(applied, expected.grad, atol=1e-6, rtol=1e-4)
    scale = float(refs.norm(dim=1).max() * applied.norm())
    assert bool((refs @ applied >= -1e-5 * scale).all()), "the applied gradient conflicts with no memory"
    sums, steps = method.loss_terms.pop()
    assert float(sums["gem_projected"]) == 1.0 and float(sums["gem_violations"]) >= 1.0

    # With clipping on, a projection longer than max_grad_norm is scaled back to it.
    start = 0
    for p in method.params:
        p.grad = proposed[start : start + p.numel()].view_as(p).clone()
        start += p.numel()
    method.project_step(model, step_args(per_device_train_batch_size=4, max_grad_norm=1e-3), step)
    clipped = torch.cat([p.grad.reshape(-1) for p in method.params])
    assert float(clipped.norm()) == pytest.approx(1e-3, rel=1e-3)
    torch.testing.assert_close(clipped / clipped.norm(), applied / applied.norm(), atol=1e-5, rtol=1e-4)
    method.loss_terms.pop()

    # No earlier memory: nothing changes, and the step is logged as not projected.
    method.memory.groups = {"now": method.memory.groups["now"]}
    before = [p.grad.clone() for p in method.params]
    method.project_step(model, args, step)
    assert all(torch.equal(p.grad, b) for p, b in zip(method.params, before, strict=True))
    sums, _ = method.loss_terms.pop()
    assert float(sums["gem_projected"]) == 0.0 and float(sums["gem_violations"]) == 0.0


def test_gradient_accumulation_gives_the_same_projected_step(tiny_config, tmp_path):
    """One trainer step, 8 rows x 1 against 2 rows x 4, with an earlier memory from the first step on: the
    projection runs once, on the accumulated gradient, and gives the same SGD update."""

    def one_step(batch, accumulation):
        config = parse_config(
            tiny_config(
                cl_method="gem",
                cl_tasks="task0",
                max_samples=8,
                lora_dropout=0.0,
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

        def begin_task(model, task, data):
            begin(model, task, data)
            perturb(model, seed=8)
            method.memory.groups = {"earlier": random_rows(8, seed=9)}

        method.begin_task = begin_task
        session.train_task(session.tasks[0], session.data[0])
        history = json.loads((session.run_dir / "logs" / "train_task_1.json").read_text())
        (entry,) = [e for e in history if "loss" in e]
        weights = {k: v.detach().clone() for k, v in adapter_parameters(session.model, "default").items()}
        return entry, weights

    entry1, weights1 = one_step(batch=8, accumulation=1)
    entry4, weights4 = one_step(batch=2, accumulation=4)
    assert entry1["gem_projected"] == entry4["gem_projected"] == 1.0
    assert entry1["loss"] == pytest.approx(entry1["loss_ce"], rel=1e-6)
    assert entry4["loss"] == pytest.approx(entry1["loss"], abs=1e-5)
    for k in weights1:
        torch.testing.assert_close(weights4[k], weights1[k], atol=1e-6, rtol=0)


# ---- runs ----------------------------------------------------------------------------------------------


run_values = partial(two_task_values, lora_dropout=0.1)


def train_loss_after(session, trained_id, task_index):
    """Mean answer-token loss on a task's train rows with the state saved after task `trained_id`."""
    session.restore(trained_id)
    batch = pad_batch(session.data[task_index].train_rows, session.tokenizer.pad_token_id)
    session.model.eval()
    with torch.no_grad():
        total, count = causal_lm_sums(session.model, batch)
    return float(total / count)
