"""A-GEM: the projection by hand, the pooled reference gradient on the tiny model, and runs.

The memories, the reference-gradient pass and the callback are shared with GEM and tested in
tests/test_gem.py; this file checks what A-GEM does differently."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from retain.cl.agem import AGEMArguments
from retain.cl.agem.method import AGEM
from retain.cl.buffer import load_row_groups
from retain.cl.projection.math import agem_project
from retain.cl.projection.memory import draw_pooled
from retain.cl.projection.method import memory_file_name
from retain.cl.registry import parse_config
from retain.errors import ConfigError, ModelError
from retain.model.adapters import adapter_parameters
from retain.model.tiny import build_tiny_llama, build_tiny_tokenizer
from retain.training.sequence import Session
from tests.run_helpers import log_entries
from tests.test_projection import (
    hand_gradient,
    perturb,
    random_rows,
    run_values,
    step_args,
    train_loss_after,
)

MEMORY_FILE = memory_file_name("agem")


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    ("g", "r", "expected", "projected"),
    [
        # g . r = -2, r . r = 1: g - (-2 / 1) r
        ((1.0, -2.0, 0.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), True),
        # g . r = -3, r . r = 2: g + 1.5 r
        ((2.0, -1.0), (-1.0, 1.0), (0.5, 0.5), True),
        # g . r = 4 - 1 = 3 >= 0: unchanged
        ((2.0, -1.0), (2.0, 1.0), (2.0, -1.0), False),
        # g . r = 0: no conflict
        ((1.0, 0.0), (0.0, 5.0), (1.0, 0.0), False),
        # r = 0: nothing to project against
        ((1.0, -1.0), (0.0, 0.0), (1.0, -1.0), False),
    ],
)
def test_projection_by_hand(g, r, expected, projected):
    result = agem_project(t(*g), t(*r))
    assert result.projected == projected and result.violated == int(projected)
    torch.testing.assert_close(result.grad, t(*expected), atol=1e-12, rtol=0)
    assert float(result.grad @ t(*r)) >= -1e-12
    if not projected:
        assert result.grad is not None and torch.equal(result.grad, t(*g))


def test_projection_removes_exactly_the_conflicting_component():
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        g, r = (
            torch.randn(7, generator=gen, dtype=torch.float64),
            torch.randn(7, generator=gen, dtype=torch.float64),
        )
        result = agem_project(g, r)
        if float(g @ r) < 0:
            assert abs(float(result.grad @ r)) < 1e-12  # lands on the constraint's boundary
            # Only the component along r changes: what is orthogonal to r stays.
            ortho = g - (g @ r) / (r @ r) * r
            torch.testing.assert_close(result.grad, ortho, atol=1e-12, rtol=0)
            assert float(result.grad.norm()) <= float(g.norm())
        else:
            assert torch.equal(result.grad, g)


def test_arguments_defaults_and_checks():
    args = AGEMArguments()
    assert (args.agem_memory_size, args.agem_batch_size) == (256, None)
    for key, value in (("agem_memory_size", -1), ("agem_batch_size", 0)):
        with pytest.raises(ConfigError) as info:
            AGEMArguments(**{key: value})
        assert info.value.field == key
    config = parse_config({"model_name_or_path": "tiny-random-llama", "cl_tasks": "a", "use_agem": True})
    assert config.cl.cl_method == "agem"
    with pytest.raises(ConfigError) as info:
        parse_config({"model_name_or_path": "x", "cl_tasks": "a", "cl_method": "gem", "agem_memory_size": 1})
    assert info.value.field == "agem_memory_size"


def test_project_step_uses_one_pooled_reference_gradient(tiny_config):
    method = AGEM(parse_config(tiny_config(cl_method="agem", cl_tasks="task0", lora_dropout=0.0)))
    tokenizer = build_tiny_tokenizer()
    model = method.prepare_model(build_tiny_llama(tokenizer), tokenizer)
    perturb(model, seed=1)
    method.memory.groups = {"a": random_rows(5, seed=2), "b": random_rows(5, seed=3)}
    method.current = SimpleNamespace(name="c")
    step = 2
    drawn = draw_pooled(method.memory.groups, ["a", "b"], 6, method.draw_rng(step))
    assert len(drawn) == 6
    model.eval()
    ref = hand_gradient(model, method.params, drawn, tokenizer.pad_token_id)
    model.train()
    proposed = -ref + 0.3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    assert float(proposed @ ref) < 0
    start = 0
    for p in method.params:
        p.grad = proposed[start : start + p.numel()].view_as(p).clone()
        start += p.numel()
    method.project_step(model, step_args(per_device_train_batch_size=3, gradient_accumulation_steps=2), step)
    applied = torch.cat([p.grad.reshape(-1) for p in method.params])
    expected = proposed - (proposed @ ref) / (ref @ ref) * ref
    torch.testing.assert_close(applied, expected, atol=1e-6, rtol=1e-4)
    assert abs(float(applied @ ref)) <= 1e-4 * float(ref.norm() * applied.norm())
    sums, _ = method.loss_terms.pop()
    assert set(sums) == {"agem_projected"} and float(sums["agem_projected"]) == 1.0


def test_memory_size_zero_is_exactly_seq_and_the_memory_holds_task_1(tiny_config, learnable_dir, tmp_path):
    runs = {}
    for name, overrides in (
        ("seq", {"cl_method": "seq"}),
        ("agem0", {"cl_method": "agem", "agem_memory_size": 0}),
        ("agem", {"cl_method": "agem"}),
    ):
        session = Session(parse_config(run_values(tiny_config, learnable_dir, tmp_path, name, **overrides)))
        runs[name] = (session, session.run())
    (seq, seq_metrics), (agem0, agem0_metrics) = runs["seq"], runs["agem0"]
    assert agem0_metrics["matrix"] == seq_metrics["matrix"]
    assert max(v for row in seq_metrics["matrix"] for v in row) > 0, "the tasks must be learned"
    seq_weights = adapter_parameters(seq.model, "default")
    agem_weights = adapter_parameters(agem0.model, "default")
    assert all(torch.equal(agem_weights[k], seq_weights[k]) for k in seq_weights)
    for task_id in (1, 2):
        assert [e["loss"] for e in log_entries(tmp_path / "agem0", task_id)] == [
            e["loss"] for e in log_entries(tmp_path / "seq", task_id)
        ]
    # With a memory, task 2's updates hurt task 1 less: its loss rises less than under seq.
    before = train_loss_after(seq, 1, 0)
    rise = {name: train_loss_after(runs[name][0], 2, 0) - before for name in ("seq", "agem")}
    assert rise["seq"] > 0.1 and rise["agem"] < 0.8 * rise["seq"]
    assert sum(e["agem_projected"] for e in log_entries(tmp_path / "agem", 2)) > 0


def test_run_projects_saves_memories_and_continues_in_a_new_process(tiny_config, learnable_dir, tmp_path):
    values = run_values(
        tiny_config,
        learnable_dir,
        tmp_path,
        "run",
        cl_method="agem",
        cl_tasks="task0,task1,task2",
        agem_memory_size=6,
    )
    session = Session(parse_config(values))
    metrics = session.run()
    out = tmp_path / "run"
    assert (out / "metrics.json").is_file() and len(metrics["matrix"]) == 4
    for task_id in (1, 2, 3):
        entries = log_entries(out, task_id)
        assert all(e["loss"] == pytest.approx(e["loss_ce"], rel=1e-6) for e in entries)
        assert all(e["agem_projected"] in (0.0, 1.0) for e in entries)
        groups = load_row_groups(out / f"task_{task_id}" / MEMORY_FILE)
        assert list(groups) == [f"task{i}" for i in range(task_id)]
        assert all(len(rows) == 6 for rows in groups.values())  # agem_memory_size of each task's 16 rows
    assert all(e["agem_projected"] == 0.0 for e in log_entries(out, 1))
    assert sum(e["agem_projected"] for task_id in (2, 3) for e in log_entries(out, task_id)) > 0

    continued = {
        **values,
        "cl_tasks": "task2",
        "previous_task_model": str(out / "task_2"),
        "current_task_id": 3,
        "output_dir": str(tmp_path / "continued"),
    }
    Session(parse_config(continued)).run(train=True, evaluate=False)
    a = load_file(str(out / "task_3" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "continued" / "task_3" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A gem task directory is not an agem one: the memory file is named by the method.
    (out / "task_2" / MEMORY_FILE).rename(out / "task_2" / "gem_memory.safetensors")
    broken = Session(parse_config({**continued, "output_dir": str(tmp_path / "broken")}))
    broken.load()
    with pytest.raises(ModelError, match="agem memory not found"):
        broken.restore(0)
    assert json.loads((out / "metrics.json").read_text())["method"] == "agem"
