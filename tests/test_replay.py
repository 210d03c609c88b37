import random
from collections import Counter

import pytest

from retain.cl.buffer import ReservoirBuffer
from retain.cl.registry import parse_config
from retain.errors import ConfigError
from retain.training.sequence import Session


def test_reservoir_inclusion_is_uniform():
    # 100 streams of 50 rows into a buffer of 10: each row is kept with probability 10/50.
    counts = Counter()
    for trial in range(2000):
        buffer = ReservoirBuffer(10, seed=trial)
        for i in range(50):
            buffer.add({"input_ids": [i]})
        counts.update(row["input_ids"][0] for row in buffer.rows)
    expected = 2000 * 10 / 50  # 400 per row
    # Binomial sd = sqrt(2000 * 0.2 * 0.8) ~ 17.9; allow 5 sd per row.
    assert all(abs(counts[i] - expected) < 90 for i in range(50)), counts
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(50))
    assert chi2 < 90  # df = 49; p(chi2 > 90) < 0.001


def test_reservoir_round_trip(tmp_path):
    buffer = ReservoirBuffer(3, seed=1)
    for i in range(7):
        buffer.add({"input_ids": list(range(i + 1)), "labels": [-100] * i + [i]})
    buffer.save(tmp_path / "b.safetensors")
    loaded = ReservoirBuffer(0)
    loaded.load(tmp_path / "b.safetensors")
    assert loaded.rows == buffer.rows and loaded.num_seen == 7 and loaded.capacity == 3
    # The random stream continues identically.
    buffer.add({"input_ids": [9], "labels": [9]})
    loaded.add({"input_ids": [9], "labels": [9]})
    assert loaded.rows == buffer.rows
    empty = ReservoirBuffer(5)
    empty.save(tmp_path / "e.safetensors")
    ReservoirBuffer(1).load(tmp_path / "e.safetensors")


def test_sample_is_without_replacement():
    buffer = ReservoirBuffer(5)
    for i in range(5):
        buffer.add({"input_ids": [i]})
    rows = buffer.sample(3, random.Random(0))
    assert len({r["input_ids"][0] for r in rows}) == 3
    assert len(buffer.sample(10, random.Random(0))) == 5


def record_training_rows(session):
    """Train every task, recording (own rows, rows the trainer saw) per task id."""
    seen = {}
    original = session.method.training_rows

    def record(task, rows):
        mixed = original(task, rows)
        seen[task.id] = (rows, mixed)
        return mixed

    session.method.training_rows = record
    for task, data in zip(session.tasks, session.data, strict=True):
        session.train_task(task, data)
    return seen


def as_keys(rows):
    return [tuple(r["input_ids"]) for r in rows]


def test_mixing_draws_from_a_reservoir_of_earlier_rows(tiny_config):
    session = Session(
        parse_config(tiny_config(cl_method="replay", replay_mix_ratio=0.5, replay_buffer_size=100))
    )
    session.load()
    seen = record_training_rows(session)
    rows1, mixed1 = seen[1]
    assert mixed1 == rows1  # nothing to replay before the first task
    rows3, mixed3 = seen[3]
    extra = mixed3[len(rows3) :]
    assert len(extra) == round(0.5 * len(rows3))
    task0, task1 = set(as_keys(session.data[0].train_rows)), set(as_keys(session.data[1].train_rows))
    assert set(as_keys(extra)) <= task0 | task1
    # Both earlier tasks are represented (the memory holds a uniform sample of them).
    assert set(as_keys(extra)) & task0 and set(as_keys(extra)) & task1


def test_easycl_ratio_replays_a_share_of_every_earlier_task(tiny_config):
    # 16 train rows per task: int(0.25 * 16) = 4 rows of each earlier task.
    session = Session(parse_config(tiny_config(cl_method="replay", replay_ratio=0.25)))
    session.load()
    seen = record_training_rows(session)
    rows1, mixed1 = seen[1]
    assert mixed1 == rows1
    rows2, mixed2 = seen[2]
    rows3, mixed3 = seen[3]
    extra2, extra3 = as_keys(mixed2[len(rows2) :]), as_keys(mixed3[len(rows3) :])
    task0, task1 = set(as_keys(session.data[0].train_rows)), set(as_keys(session.data[1].train_rows))
    assert len(task0) == 16 and len(extra2) == 4 and set(extra2) <= task0
    assert len(extra3) == 8
    assert len(set(extra3) & task0) == 4 and len(set(extra3) & task1) == 4
    # Task 0's share is drawn once and replayed unchanged with every later task.
    assert [k for k in extra3 if k in task0] == extra2


def test_easycl_task_list_and_max_samples(tiny_config, tmp_path):
    values = tiny_config(
        cl_method="replay", cl_tasks="task1,task2", replay_task_list="task0,task1", maxsamples_list="3,5"
    )
    session = Session(parse_config(values))
    session.load()
    seen = record_training_rows(session)
    # task0 is not in this run: replay reads it from dataset_dir.
    other = Session(parse_config(tiny_config(cl_tasks="task0", output_dir=str(tmp_path / "other"))))
    other.load()
    task0_rows = set(as_keys(other.data[0].train_rows))
    rows1, mixed1 = seen[1]
    extra1 = as_keys(mixed1[len(rows1) :])
    assert len(extra1) == 3 and set(extra1) <= task0_rows  # task0 read from dataset_dir, 3 rows
    rows2, mixed2 = seen[2]
    extra2 = as_keys(mixed2[len(rows2) :])
    task1 = set(as_keys(session.data[0].train_rows))
    assert len(extra2) == 8 and len(set(extra2) & task0_rows) == 3 and len(set(extra2) & task1) == 5


def test_replay_config_checks():
    base = {"model_name_or_path": "tiny-random-llama", "cl_tasks": "a", "cl_method": "replay"}
    assert parse_config(base).method_args.replay_ratio == 0.3  # EasyCL's default
    cases = {
        "replay_buffer_size": ({"replay_mix_ratio": 1.0, "replay_buffer_size": -1}, ">= 0"),
        "replay_ratio": ({"replay_ratio": 0.5, "replay_mix_ratio": 1.0}, "contradicts replay_mix_ratio"),
        "maxsamples_list": ({"maxsamples_list": "3"}, "needs replay_task_list"),
    }
    for field, (values, message) in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            parse_config({**base, **values})
        assert err.value.field == field
    with pytest.raises(ConfigError, match="has 1 entries but replay_task_list has 2"):
        parse_config({**base, "replay_task_list": "a,b", "maxsamples_list": "3"})
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        parse_config({**base, "replay_ratio": 1.5})
    # One listed task: a bare number is its one count, as the string '3' is; a boolean is not a count.
    listed = {**base, "replay_task_list": "a"}
    assert parse_config({**listed, "maxsamples_list": 3}).method_args.maxsamples_list == [3]
    assert parse_config({**listed, "maxsamples_list": "3"}).method_args.maxsamples_list == [3]
    with pytest.raises(ConfigError, match="expected a list of int or null, got True") as err:
        parse_config({**listed, "maxsamples_list": True})
    assert err.value.field == "maxsamples_list"
