"""ssr: the K-means selection by hand, the features, the whole chain (written inputs, answers of the
latest model, selection) on the tiny model, and `pseudo_sample_memory: 0` against seq."""

import json
from functools import partial

import numpy as np
import pytest
import torch

from retain.cl.registry import parse_config
from retain.cl.rehearsal.rows import alpaca_to_example, derived_seed, parse_few_shot_completion
from retain.cl.ssr import SSRArguments
from retain.cl.ssr.selection import cluster_select, round_robin_nearest
from retain.errors import ConfigError
from retain.model.adapters import adapter_parameters
from retain.training.sequence import Session
from tests.run_helpers import two_task_values
from tests.test_pseudo_replay import record_training_rows

# ---- selection, by hand --------------------------------------------------------------------------------


def test_round_robin_takes_the_nearest_row_of_each_cluster_first():
    features = np.array([[0.0], [0.5], [5.0], [5.5], [4.5], [10.0]])
    labels = np.array([0, 0, 1, 1, 1, 2])
    centers = np.array([[0.25], [5.125], [10.0]])
    # Distances: cluster 0: rows 0 and 1 at 0.25 (a tie: the lower index first); cluster 1: row 2 at 0.125,
    # row 3 at 0.375, row 4 at 0.625; cluster 2: row 5 at 0.
    assert round_robin_nearest(features, labels, centers, 3) == [0, 2, 5]
    assert round_robin_nearest(features, labels, centers, 4) == [0, 2, 5, 1]
    assert round_robin_nearest(features, labels, centers, 10) == [0, 2, 5, 1, 3, 4]
    assert round_robin_nearest(features, labels, centers, 0) == []


def blobs():
    """Three tight groups of five 2-D points; the nearest point to each group's mean is known."""
    rng = np.random.default_rng(0)
    groups = [np.array(c) + rng.normal(0, 0.3, size=(5, 2)) for c in ([0, 0], [10, 0], [0, 10])]
    points = np.concatenate(groups)
    nearest = [
        5 * g + int(np.argmin(np.linalg.norm(groups[g] - groups[g].mean(0), axis=1))) for g in range(3)
    ]
    return points, nearest


def test_kmeans_picks_the_row_nearest_each_centroid():
    points, nearest = blobs()
    picked = cluster_select(points, n_clusters=3, budget=3, seed=7)
    assert sorted(picked) == sorted(nearest)
    assert cluster_select(points, n_clusters=3, budget=3, seed=7) == picked  # seeded
    # More clusters than the budget: the budget is the number of clusters.
    assert sorted(cluster_select(points, n_clusters=20, budget=3, seed=7)) == sorted(nearest)
    six = cluster_select(points, n_clusters=3, budget=6, seed=7)
    assert len(set(six)) == 6 and sorted(six[:3]) == sorted(nearest)
    assert sorted({i // 5 for i in six[3:]}) == [0, 1, 2]  # the second round takes one more of each group
    assert sorted(cluster_select(points, n_clusters=3, budget=100, seed=7)) == list(range(15))
    assert cluster_select(points[:0], n_clusters=3, budget=5, seed=7) == []
    assert cluster_select(points, n_clusters=3, budget=0, seed=7) == []


def test_arguments_defaults_and_checks():
    args = SSRArguments()
    assert (args.num_shots, args.generation_temperature, args.n_clusters, args.pseudo_sample_memory) == (
        2,
        0.9,
        20,
        200,
    )
    assert args.ssr_num_candidates == 400 and SSRArguments(pseudo_sample_memory=5).ssr_num_candidates == 10
    base = {"model_name_or_path": "tiny-random-llama", "cl_tasks": "a"}
    config = parse_config({**base, "use_ssr": True, "base_model_path": "b", "pseudo_samples_dir": "p"})
    assert config.cl.cl_method == "ssr" and config.method_args.base_model_path == "b"
    cases = (
        ("num_shots", 0),
        ("generation_temperature", -1.0),
        ("n_clusters", 0),
        ("pseudo_sample_memory", -1),
        ("ssr_num_candidates", -2),
    )
    for key, value in cases:
        with pytest.raises(ConfigError) as info:
            parse_config({**base, "cl_method": "ssr", key: value})
        assert info.value.field == key


# ---- runs ----------------------------------------------------------------------------------------------


def stub_inputs(method):
    """The base model's sampling replaced: 12 blocks of the prompt's task, 2 malformed, 1 repeated input."""
    calls = []

    def sample(model, tokenizer, prompt_ids, count, max_new_tokens, temperature, seed, desc):
        prompt = tokenizer.decode(prompt_ids)
        instruction = prompt.split("Instruction: ", 1)[1].split("\n", 1)[0]
        calls.append({"count": count, "temperature": temperature, "shots": prompt.count("Instruction:") - 1})
        texts = [f" {instruction}\nInput: new item {i}\nOutput: ignored\n\n" for i in range(count - 3)]
        texts += ["garbage", f" {instruction}\nOutput: no input\n\n", texts[0]]
        return texts, [True] * count

    method.sample = sample
    return calls


run_values = partial(
    two_task_values, cl_method="ssr", pseudo_sample_memory=4, n_clusters=3, ssr_num_candidates=12
)


def test_written_inputs_are_answered_by_the_latest_model_and_selected(tiny_config, learnable_dir, tmp_path):
    session = Session(parse_config(run_values(tiny_config, learnable_dir, tmp_path, "run")))
    calls = stub_inputs(session.method)
    seen = record_training_rows(session)
    session.run()
    out = tmp_path / "run"
    assert calls == [{"count": 12, "temperature": 0.9, "shots": 2}] * 2

    counts = json.loads((out / "pseudo" / "summary.json").read_text())["task0"]["rows_of"]["task0"]
    # 12 written: 2 malformed, 1 repeated input, 9 answered, 4 kept (pseudo_sample_memory), 5 not selected.
    assert counts == {
        "generated": 12,
        "malformed": 2,
        "duplicates": 1,
        "kept": 4,
        "unanswered": 0,
        "not_selected": 5,
    }
    rows = json.loads((out / "pseudo" / "task0.json").read_text())
    assert rows == session.method.memory["task0"] and len(rows) == 4

    # Recompute the chain with the model as it was after task 1 (the latest model when the rows were made).
    session.restore(1)
    method, task, data = session.method, session.tasks[0], session.data[0]
    texts = [f" Task 0.\nInput: new item {i}\nOutput: ignored\n\n" for i in range(9)]
    inputs = [parse_few_shot_completion(t, True, need_output=False) for t in texts]
    answered = method.refine(session.model, task, data, inputs)
    assert all(r["output"] == "yes" for r in answered), "task 0 is learned: the latest model answers it"
    features = method.features(session.model, answered)
    picked = cluster_select(features, 3, 4, derived_seed(0, "ssr", "kmeans", "task0"))
    assert rows == [answered[i] for i in picked]

    # The features are each row's mean last-layer hidden state (batching and padding change nothing).
    encoded = method.builder.encode_train(alpaca_to_example(answered[5]), 1024)
    with torch.no_grad():
        hidden = session.model(input_ids=torch.tensor([encoded["input_ids"]]), output_hidden_states=True)
    torch.testing.assert_close(
        torch.from_numpy(features[5]).float(), hidden.hidden_states[-1][0].mean(0), atol=1e-5, rtol=1e-5
    )

    # Task 2 rehearses the 4 rows, encoded like train rows.
    own, mixed = seen[2]
    assert mixed[len(own) :] == [method.builder.encode_train(alpaca_to_example(r), 1024) for r in rows]


def test_no_memory_is_exactly_seq(tiny_config, learnable_dir, tmp_path):
    runs = {}
    for name, overrides in (("seq", {"cl_method": "seq"}), ("zero", {"pseudo_sample_memory": 0})):
        values = run_values(tiny_config, learnable_dir, tmp_path, name, **overrides)
        if name == "seq":
            values = {k: v for k, v in values.items() if k not in SSRArguments.__dataclass_fields__}
        session = Session(parse_config(values))
        runs[name] = (session, session.run())
    (seq, seq_metrics), (zero, zero_metrics) = runs["seq"], runs["zero"]
    assert zero_metrics["matrix"] == seq_metrics["matrix"]
    assert max(v for row in seq_metrics["matrix"] for v in row) > 0
    a, b = adapter_parameters(seq.model, "default"), adapter_parameters(zero.model, "default")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_rows_for_the_last_task_changes_no_result(tiny_config, learnable_dir, tmp_path):
    runs = {}
    for name, last in (("all", True), ("skip", False)):
        session = Session(
            parse_config(run_values(tiny_config, learnable_dir, tmp_path, name, generate_for_last_task=last))
        )
        calls = stub_inputs(session.method)
        runs[name] = (session, session.run(), calls)
    (full, full_metrics, full_calls), (skip, skip_metrics, skip_calls) = runs["all"], runs["skip"]
    assert len(full_calls) == 2 and len(skip_calls) == 1, "nothing is made when the last task ends"
    assert skip.method.memory == {"task0": full.method.memory["task0"], "task1": []}
    assert not (tmp_path / "skip" / "pseudo" / "task1.json").exists()
    assert skip_metrics["matrix"] == full_metrics["matrix"]
