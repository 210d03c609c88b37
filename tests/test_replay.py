import random
from collections import Counter

import pytest

from retain.cl.buffer import ReservoirBuffer
from retain.hparams.parser import parse_config
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


def test_replay_draws_earlier_tasks_rows(tiny_config):
    session = Session(parse_config(tiny_config(cl_method="replay", replay_ratio=0.5, replay_buffer_size=100)))
    session.load()
    seen = {}
    original = session.method.training_rows

    def record(task, rows):
        mixed = original(task, rows)
        seen[task.id] = (rows, mixed)
        return mixed

    session.method.training_rows = record
    for task, data in zip(session.tasks, session.data, strict=True):
        session.train_task(task, data)
    rows1, mixed1 = seen[1]
    assert mixed1 == rows1  # nothing to replay before the first task
    rows3, mixed3 = seen[3]
    extra = mixed3[len(rows3) :]
    assert len(extra) == round(0.5 * len(rows3))
    earlier = [tuple(r["input_ids"]) for d in session.data[:2] for r in d.train_rows]
    assert all(tuple(r["input_ids"]) in earlier for r in extra)
    # Both earlier tasks are represented (the memory holds a uniform sample of them).
    from_task = Counter(
        0 if tuple(r["input_ids"]) in {tuple(x["input_ids"]) for x in session.data[0].train_rows} else 1
        for r in extra
    )
    assert from_task[0] > 0 and from_task[1] > 0


def test_replay_config_checks():
    base = {"model_name_or_path": "tiny-random-llama", "cl_tasks": "a", "cl_method": "replay"}
    with pytest.raises(Exception, match="replay_buffer_size"):
        parse_config({**base, "replay_buffer_size": -1})
