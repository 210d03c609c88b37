"""GEM: the QP by hand (closed forms), its keys, and runs (switch-off = seq, the memory's effect, saved
memories, continuation, EasyCL's replay_task_list). The shared machinery: tests/test_projection.py."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from retain.cl.buffer import load_row_groups
from retain.cl.gem import GEMArguments
from retain.cl.gem.method import GEM
from retain.cl.projection.math import gem_project
from retain.cl.projection.method import memory_file_name
from retain.cl.registry import parse_config
from retain.errors import ConfigError, ModelError
from retain.model.adapters import adapter_parameters
from retain.training.sequence import Session
from tests.run_helpers import log_entries
from tests.test_projection import run_values, train_loss_after

# ---- the QP by hand ------------------------------------------------------------------------------------

MEMORY_FILE = memory_file_name("gem")


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_no_conflict_returns_the_gradient_itself_whatever_the_margin():
    g = t(1.0, 2.0, -1.0)
    refs = torch.stack([t(1.0, 0.0, 0.0), t(0.0, 1.0, 2.0)])  # <g, g_k> = 1 and 0: no conflict
    for margin in (0.0, 0.5, 3.0):
        result = gem_project(g, refs, margin)
        assert result.grad is g and not result.projected and result.violated == 0
    empty = gem_project(g, torch.zeros(0, 3, dtype=torch.float64), 0.5)
    assert empty.grad is g and not empty.projected


@pytest.mark.parametrize(
    ("g", "r", "margin", "expected"),
    [
        # v = max(margin, -<g, r> / |r|^2); g~ = g + v r
        ((1.0, -2.0, 0.0), (0.0, 1.0, 0.0), 0.0, (1.0, 0.0, 0.0)),  # v = 2
        ((1.0, -2.0, 0.0), (0.0, 1.0, 0.0), 0.5, (1.0, 0.0, 0.0)),  # v = max(0.5, 2) = 2
        ((1.0, -2.0, 0.0), (0.0, 1.0, 0.0), 3.0, (1.0, 1.0, 0.0)),  # v = 3: the margin wins
        ((2.0, -1.0), (-1.0, 1.0), 0.0, (0.5, 0.5)),  # <g, r> = -3, |r|^2 = 2: v = 1.5
        ((2.0, -1.0), (-1.0, 1.0), 2.0, (0.0, 1.0)),  # v = max(2, 1.5) = 2
    ],
)
def test_one_constraint_matches_the_closed_form(g, r, margin, expected):
    result = gem_project(t(*g), t(*r).unsqueeze(0), margin)
    assert result.projected and result.violated == 1
    torch.testing.assert_close(result.grad, t(*expected), atol=1e-12, rtol=0)
    assert float(result.grad @ t(*r)) >= -1e-12


def test_two_constraints_by_hand():
    # The positive quadrant: (-1, -2) projects to the origin, both constraints active.
    both = gem_project(t(-1.0, -2.0), torch.eye(2, dtype=torch.float64), 0.0)
    assert both.violated == 2
    torch.testing.assert_close(both.grad, t(0.0, 0.0), atol=1e-12, rtol=0)
    # {x1 >= 0, x1 + x2 >= 0}: (-1, 3) violates only the first; its projection (0, 3) meets the second.
    refs = torch.stack([t(1.0, 0.0), t(1.0, 1.0)])
    one = gem_project(t(-1.0, 3.0), refs, 0.0)
    assert one.violated == 1
    torch.testing.assert_close(one.grad, t(0.0, 3.0), atol=1e-12, rtol=0)
    # Margin 0.5: both dual variables >= 0.5; at v = (0.5, 0.5) the dual gradient P v + c = (0, 3.5) >= 0,
    # so v = (0.5, 0.5) and g~ = g + 0.5 (1, 0) + 0.5 (1, 1) = (0, 3.5).
    shifted = gem_project(t(-1.0, 3.0), refs, 0.5)
    torch.testing.assert_close(shifted.grad, t(0.0, 3.5), atol=1e-12, rtol=0)
    # Two equal constraints (a singular Gram matrix).
    twice = gem_project(t(-1.0, 1.0), torch.stack([t(1.0, 0.0), t(2.0, 0.0)]), 0.0)
    assert twice.violated == 2
    torch.testing.assert_close(twice.grad, t(0.0, 1.0), atol=1e-12, rtol=0)


def test_arguments_defaults_easycl_sizes_and_checks():
    args = GEMArguments()
    assert (args.gem_memory_strength, args.gem_memory_size, args.gem_batch_size) == (0.5, 256, None)
    assert args.memory_size("x", 1000) == 256 and args.memory_size("x", 10) == 10
    ratio = GEMArguments(replay_ratio=0.3)
    assert ratio.gem_memory_size is None and ratio.memory_size("x", 100) == 30
    listed = GEMArguments(replay_ratio=0.1, replay_task_list=["a", "b"], maxsamples_list=[5, 500])
    assert [listed.memory_size(n, 100) for n in ("a", "b", "c")] == [5, 100, 10]
    for kwargs, key in (
        ({"gem_memory_strength": -0.1}, "gem_memory_strength"),
        ({"gem_memory_strength": float("inf")}, "gem_memory_strength"),
        ({"gem_memory_size": -1}, "gem_memory_size"),
        ({"gem_memory_size": 10, "replay_ratio": 0.1}, "gem_memory_size"),
        ({"replay_ratio": 1.5}, "replay_ratio"),
        ({"gem_batch_size": 0}, "gem_batch_size"),
        ({"maxsamples_list": [1]}, "maxsamples_list"),
        ({"replay_task_list": ["a"], "maxsamples_list": [1, 2]}, "maxsamples_list"),
        ({"replay_task_list": ["a"], "maxsamples_list": [-1]}, "maxsamples_list"),
    ):
        with pytest.raises(ConfigError) as info:
            GEMArguments(**kwargs)
        assert info.value.field == key
    config = parse_config({"model_name_or_path": "tiny-random-llama", "cl_tasks": "a", "use_gem": True})
    assert config.cl.cl_method == "gem"
    with pytest.raises(ConfigError) as info:
        parse_config({"model_name_or_path": "x", "cl_tasks": "a", "cl_method": "seq", "gem_memory_size": 1})
    assert info.value.field == "gem_memory_size"
    # fp16 without clipping leaves loss-scaled gradients at the projection (fp16 is a GPU setting: forced here).
    fp16 = parse_config({"model_name_or_path": "x", "cl_tasks": "a", "use_gem": True, "max_grad_norm": 0})
    fp16.training.fp16 = True
    with pytest.raises(ConfigError) as info:
        GEM(fp16)
    assert info.value.field == "fp16"


def test_memory_size_zero_is_exactly_seq_and_the_memory_holds_task_1(tiny_config, learnable_dir, tmp_path):
    runs = {}
    for name, overrides in (
        ("seq", {"cl_method": "seq"}),
        ("gem0", {"cl_method": "gem", "gem_memory_size": 0}),
        ("gem", {"cl_method": "gem"}),
        ("gem_strong", {"cl_method": "gem", "gem_memory_strength": 2.0}),
    ):
        session = Session(parse_config(run_values(tiny_config, learnable_dir, tmp_path, name, **overrides)))
        runs[name] = (session, session.run())
    (seq, seq_metrics), (gem0, gem0_metrics) = runs["seq"], runs["gem0"]
    assert gem0_metrics["matrix"] == seq_metrics["matrix"]
    assert max(v for row in seq_metrics["matrix"] for v in row) > 0, "the tasks must be learned"
    seq_weights = adapter_parameters(seq.model, "default")
    gem_weights = adapter_parameters(gem0.model, "default")
    assert all(torch.equal(gem_weights[k], seq_weights[k]) for k in seq_weights)
    for task_id in (1, 2):
        entries = log_entries(tmp_path / "gem0", task_id)
        assert [e["loss"] for e in entries] == [e["loss"] for e in log_entries(tmp_path / "seq", task_id)]
        assert all(e["gem_projected"] == 0.0 for e in entries)

    # With a memory, task 2's updates hurt task 1 less: its loss rises less than under seq, and with a
    # large margin (every step leans towards task 1's gradient) it does not rise at all.
    before = train_loss_after(seq, 1, 0)
    assert train_loss_after(runs["gem"][0], 1, 0) == pytest.approx(before, abs=1e-6)  # same task 1
    rise = {name: train_loss_after(runs[name][0], 2, 0) - before for name in ("seq", "gem", "gem_strong")}
    assert rise["seq"] > 0.1 and rise["gem"] < 0.8 * rise["seq"] and rise["gem_strong"] <= 0
    assert runs["gem_strong"][1]["matrix"][2][0] == 1.0 > seq_metrics["matrix"][2][0]


def test_run_projects_saves_memories_and_continues_in_a_new_process(tiny_config, learnable_dir, tmp_path):
    values = run_values(
        tiny_config, learnable_dir, tmp_path, "run", cl_method="gem", cl_tasks="task0,task1,task2"
    )
    session = Session(parse_config(values))
    metrics = session.run()
    out = tmp_path / "run"
    assert (out / "metrics.json").is_file() and len(metrics["matrix"]) == 4
    # The logged terms add up to the loss; task 1 has nothing to project against, later tasks do.
    for task_id, earlier in ((1, 0), (2, 1), (3, 2)):
        entries = log_entries(out, task_id)
        assert all(e["loss"] == pytest.approx(e["loss_ce"], rel=1e-6) for e in entries)
        assert all(0.0 <= e["gem_violations"] <= earlier for e in entries)
        assert all(e["gem_projected"] == float(e["gem_violations"] > 0) for e in entries)
        if earlier == 0:
            assert all(e["gem_projected"] == 0.0 for e in entries)
    assert sum(e["gem_projected"] for task_id in (2, 3) for e in log_entries(out, task_id)) > 0
    # Each task directory holds the memories of the tasks so far: every train row here (16 < 256).
    for task_id in (1, 2, 3):
        groups = load_row_groups(out / f"task_{task_id}" / MEMORY_FILE)
        assert list(groups) == [f"task{i}" for i in range(task_id)]
        for i, rows in enumerate(groups.values()):
            train_rows = session.data[i].train_rows
            assert len(rows) == len(train_rows) == 16
            assert sorted(map(str, rows)) == sorted(map(str, train_rows))

    # One command per task: task 3 continued from the saved task 2 trains exactly as in one run.
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
    # The same projections (the step counter of the log differs: it counts over the sequence).
    logged = [{k: v for k, v in e.items() if k != "step"} for e in log_entries(out, 3)]
    assert [
        {k: v for k, v in e.items() if k != "step"}
        for e in log_entries(tmp_path / "continued" / "from_task3", 3)
    ] == logged

    # A task directory without a memory (e.g. from a seq run) is a clear error naming the file.
    plain = tmp_path / "plain_task"
    shutil.copytree(out / "task_1", plain)
    (plain / MEMORY_FILE).unlink()
    broken = Session(
        parse_config({**continued, "previous_task_model": str(plain), "output_dir": str(tmp_path / "b")})
    )
    broken.load()
    with pytest.raises(ModelError, match="gem memory not found") as info:
        broken.restore(0)
    assert info.value.source.endswith(MEMORY_FILE)


def test_easycl_replay_task_list_reads_memories_from_the_dataset_folder(tiny_config, learnable_dir, tmp_path):
    """EasyCL's one-command-per-task shape: task1 alone, constrained by task0 read from previous_task_dataset."""
    values = run_values(
        tiny_config,
        learnable_dir,
        tmp_path,
        "easycl",
        use_gem=True,
        cl_tasks="task1",
        replay_task_list="task0",
        maxsamples_list="5",
        previous_task_dataset=str(learnable_dir),
    )
    session = Session(parse_config(values))
    session.run(train=True, evaluate=False)
    groups = load_row_groups(tmp_path / "easycl" / "task_1" / MEMORY_FILE)
    assert list(groups) == ["task0", "task1"] and len(groups["task0"]) == 5
    assert len(groups["task1"]) == 16  # not listed: gem_memory_size rows (all 16 here)
    texts = [session.tokenizer.decode(row["input_ids"]) for row in groups["task0"]]
    assert len(set(texts)) == 5 and all("Task 0." in text for text in texts)
    entries = log_entries(tmp_path / "easycl", 1)
    assert sum(e["gem_projected"] for e in entries) > 0, "task0's memory must constrain some step"
