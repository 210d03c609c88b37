"""LAMOL: the generation format by hand, the loss L_qa + gamma * L_gen by hand (and under accumulation),
a run where the tiny model learns to write rows of its earlier task, reuse on resume, and the
switches that must give seq exactly."""

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from retain.cl.lamol import LamolArguments
from retain.cl.lamol.method import (
    SHOW_GEN_PREFIX,
    LamolCollator,
    generation_body,
    generation_marker,
    generation_row,
    parse_generation,
    stack_right_padded,
)
from retain.cl.loss import LossScale
from retain.cl.registry import parse_config
from retain.cl.rehearsal.files import STATE_FILE
from retain.cl.rehearsal.rows import alpaca_to_example
from retain.data.prompt import IGNORE_INDEX
from retain.errors import ConfigError
from retain.model.adapters import adapter_parameters
from retain.training.sequence import Session
from tests.run_helpers import two_task_values
from tests.test_pseudo_replay import record_training_rows

# ---- the generation format, by hand --------------------------------------------------------------------


def test_generation_text_and_parser():
    assert generation_marker("task0") == "__gen_task0__"
    assert generation_body("Task 0.\nitem 3", "yes") == "Task 0.\nitem 3 __ans__ yes"
    assert parse_generation("Task 0.\nitem 3 __ans__ yes", finished=True) == ("Task 0.\nitem 3", "yes")
    assert parse_generation(" q __ans__a ", finished=True) == ("q", "a")
    for text, finished in (
        ("Task 0.\nitem 3 __ans__ yes", False),  # cut at the token limit
        ("Task 0. item 3 yes", True),  # no answer marker
        ("q __ans__ a __ans__ b", True),  # two
        ("q __ans__ a __gen_task1__ r", True),  # ran into the next row
        (" __ans__ yes", True),  # empty question
        ("q __ans__  ", True),  # empty answer
    ):
        assert parse_generation(text, finished) is None, text


def test_generation_row_labels_and_cut():
    row = generation_row([7, 8], [1, 2, 3], eos_id=9, cutoff_len=10)
    assert row == {
        "gen_input_ids": [7, 8, 1, 2, 3, 9],
        "gen_labels": [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3, 9],
    }
    assert generation_row([7, 8], [1, 2, 3], eos_id=9, cutoff_len=4) == {
        "gen_input_ids": [7, 8, 1, 2],
        "gen_labels": [IGNORE_INDEX, IGNORE_INDEX, 1, 2],
    }


def test_collator_and_stacking():
    rows = [
        {"input_ids": [1, 2], "labels": [-100, 2], "gen_input_ids": [5, 6, 7], "gen_labels": [-100, 6, 7]},
        {"input_ids": [3], "labels": [3], "gen_input_ids": [8], "gen_labels": [8]},
    ]
    batch = LamolCollator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert batch["gen_input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["gen_labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["gen_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    qa = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    gen = {k: batch[f"gen_{k}"] for k in ("input_ids", "labels", "attention_mask")}
    joined = stack_right_padded(qa, gen, pad_id=0)
    assert joined["input_ids"].tolist() == [[1, 2, 0], [3, 0, 0], [5, 6, 7], [8, 0, 0]]
    assert joined["labels"].tolist() == [[-100, 2, -100], [3, -100, -100], [-100, 6, 7], [8, -100, -100]]
    assert joined["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    plain = LamolCollator(pad_id=0)([{"input_ids": [1], "labels": [1]}])
    assert set(plain) == {"input_ids", "labels", "attention_mask"}


def test_arguments_defaults_and_checks():
    args = LamolArguments()
    assert (args.lamol_gamma, args.lamol_num_samples_per_task, args.lamol_generation_temperature) == (
        0.25,
        200,
        1.0,
    )
    assert args.lamol_show_gen is False and args.lamol_samples_dir is None
    base = {"model_name_or_path": "tiny-random-llama", "cl_tasks": "a"}
    config = parse_config({**base, "use_lamol": True, "lamol_show_gen": True, "lamol_samples_dir": "d"})
    assert config.cl.cl_method == "lamol" and config.method_args.lamol_show_gen
    for key, value in (
        ("lamol_gamma", -0.1),
        ("lamol_num_samples_per_task", -1),
        ("lamol_generation_temperature", 0.0),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config({**base, "cl_method": "lamol", key: value})
        assert info.value.field == key


# ---- the loss, by hand ---------------------------------------------------------------------------------


def mean_token_ce(model, ids, labels):
    """Sum and count of next-token cross-entropies over labelled tokens, one unpadded row at a time."""
    total, count = torch.zeros(()), 0
    for row_ids, row_labels in zip(ids, labels, strict=True):
        logits = model(input_ids=torch.tensor([row_ids])).logits[0, :-1]
        targets = torch.tensor(row_labels[1:])
        total = total + F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


def test_step_loss_is_qa_plus_gamma_times_gen(tiny_config):
    session = Session(parse_config(tiny_config(cl_method="lamol", cl_tasks="task0", lamol_gamma=0.5)))
    session.load()
    method, model = session.method, session.model
    rows = session.data[0].train_rows[:4]
    assert all(set(r) == {"input_ids", "labels", "gen_input_ids", "gen_labels"} for r in rows)
    marker = method.tokenizer(generation_marker("task0"))["input_ids"]
    assert all(r["gen_input_ids"][: len(marker)] == marker for r in rows)
    # The generation row is the marker, then the user turn, ` __ans__ `, the answer and EOS, all labelled.
    example = session.data[0].train[0]
    body = method.tokenizer(
        generation_body(example.messages[-1]["content"], example.answer), add_special_tokens=False
    )
    assert rows[0]["gen_labels"] == [IGNORE_INDEX] * len(marker) + body["input_ids"] + [
        method.tokenizer.eos_token_id
    ]
    with torch.no_grad():  # move lora_B off zero so the adapter matters
        for p in adapter_parameters(model, "default").values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.train()

    with torch.no_grad():
        qa_sum, qa_count = mean_token_ce(model, [r["input_ids"] for r in rows], [r["labels"] for r in rows])
        gen_sum, gen_count = mean_token_ce(
            model, [r["gen_input_ids"] for r in rows], [r["gen_labels"] for r in rows]
        )
    expected = qa_sum / qa_count + 0.5 * gen_sum / gen_count

    collate = method.collator(method.tokenizer)
    batch = collate(rows)
    method.loss_terms.pop()
    method.begin_step([batch])
    assert int(method.step_gen_tokens) == gen_count
    loss = method.compute_loss(model, batch, LossScale(num_items=torch.tensor(qa_count)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    sums, _ = method.loss_terms.pop()
    assert sums["loss_qa"].item() == pytest.approx((qa_sum / qa_count).item(), rel=1e-5)
    assert (sums["loss_qa"] + sums["loss_gen"]).item() == pytest.approx(loss.item(), rel=1e-6)

    # Two micro-batches of 2 rows (accumulation 2) add up to the same step loss and the same gradient.
    params = list(adapter_parameters(model, "default").values())
    whole = torch.autograd.grad(
        method.compute_loss(model, batch, LossScale(num_items=torch.tensor(qa_count))), params
    )
    halves = [collate(rows[:2]), collate(rows[2:])]
    method.begin_step(halves)
    scale = LossScale(num_items=torch.tensor(qa_count), accumulation_steps=2)
    parts = [method.compute_loss(model, half, scale) for half in halves]
    assert sum(p.item() for p in parts) == pytest.approx(loss.item(), rel=1e-5)
    split = torch.autograd.grad(parts[0] + parts[1], params)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("ratio", "new_rows", "earlier", "expected"),
    [
        (0.2, 100, 1, 20),
        (0.2, 100, 3, 6),  # 20 // 3
        (0.2, 100, 13, 1),
        (0.2, 100, 21, 0),  # more earlier tasks than rows: none
        (0.05, 35, 1, 2),  # ceil(1.75)
        (0.05, 35, 3, 0),
        (0.7, 100, 1, 70),  # 0.7 * 100 is 70.00000000000001 in floats: still 70
    ],
)
def test_sample_ratio_splits_the_new_tasks_share_over_the_earlier_tasks(ratio, new_rows, earlier, expected):
    args = LamolArguments(lamol_sample_ratio=ratio)
    assert args.lamol_num_samples_per_task is None
    assert args.rows_per_earlier_task(new_rows, earlier) == expected
    assert LamolArguments(lamol_num_samples_per_task=7).rows_per_earlier_task(new_rows, earlier) == 7


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"lamol_sample_ratio": 0.2, "lamol_num_samples_per_task": 5}, "lamol_num_samples_per_task"),
        ({"lamol_sample_ratio": 0.0}, "lamol_sample_ratio"),
        ({"lamol_sample_ratio": 1.5}, "lamol_sample_ratio"),
        ({"lamol_sample_ratio": float("nan")}, "lamol_sample_ratio"),
    ],
)
def test_sample_ratio_checks(values, field):
    base = {"model_name_or_path": "tiny-random-llama", "cl_tasks": "a", "cl_method": "lamol"}
    with pytest.raises(ConfigError) as info:
        parse_config({**base, **values})
    assert info.value.field == field


# ---- runs ----------------------------------------------------------------------------------------------


run_values = partial(two_task_values, cl_method="lamol")


def test_switched_off_is_exactly_seq(tiny_config, learnable_dir, tmp_path):
    runs = {}
    for name, overrides in (
        ("seq", {"cl_method": "seq"}),
        ("off", {"lamol_gamma": 0.0, "lamol_num_samples_per_task": 0}),
    ):
        session = Session(parse_config(run_values(tiny_config, learnable_dir, tmp_path, name, **overrides)))
        runs[name] = (session, session.run())
    (seq, seq_metrics), (off, off_metrics) = runs["seq"], runs["off"]
    assert off_metrics["matrix"] == seq_metrics["matrix"]
    assert max(v for row in seq_metrics["matrix"] for v in row) > 0
    a, b = adapter_parameters(seq.model, "default"), adapter_parameters(off.model, "default")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for task_id in (1, 2):
        logs = [
            json.loads((tmp_path / n / "logs" / f"train_task_{task_id}.json").read_text())
            for n in ("seq", "off")
        ]
        assert [e["loss"] for e in logs[0] if "loss" in e] == [e["loss"] for e in logs[1] if "loss" in e]
    assert not (tmp_path / "off" / "pseudo").exists()


def test_the_model_learns_to_write_rows_of_its_earlier_task(tiny_config, learnable_dir, tmp_path):
    """Long enough (16 epochs, gamma 1) for the tiny model to write task 0's rows after its marker; a low
    temperature makes the sampled rows the learned ones."""
    values = run_values(
        tiny_config,
        learnable_dir,
        tmp_path,
        "run",
        num_train_epochs=16,
        lamol_gamma=1.0,
        lamol_num_samples_per_task=8,
        lamol_generation_temperature=0.05,
        lamol_show_gen=True,
        lamol_samples_dir=str(tmp_path / "copies"),
        eval_base=False,
    )
    session = Session(parse_config(values))
    seen = record_training_rows(session)
    session.run()
    out = tmp_path / "run"

    rows = json.loads((out / "pseudo" / "task1.json").read_text())
    counts = json.loads((out / "pseudo" / "summary.json").read_text())["task1"]["rows_of"]
    assert list(counts) == ["task0"]
    c = counts["task0"]
    assert c["generated"] == 8 == c["malformed"] + c["duplicates"] + c["kept"] and c["kept"] == len(rows) >= 1
    assert {"instruction": "Task 0.", "input": "item 0", "output": "yes", "task": "task0"} in rows
    assert all(r["task"] == "task0" and r["output"] == "yes" for r in rows)
    assert rows == json.loads((tmp_path / "copies" / "task1.json").read_text())
    # The counts reach the report: malformed generations are counted there, never trained on silently.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method_info"]["pseudo_rows"]["task1"]["task0"] == c
    assert '"malformed": ' in (out / "report.md").read_text()

    # Task 2 trains its own rows and the written ones: the question (with lamol_show_gen's prefix) and
    # the generation row under task 0's marker.
    own, mixed = seen[2]
    method = session.method
    written = mixed[len(own) :]
    assert len(written) == len(rows)
    for row, item in zip(rows, written, strict=True):
        qa = method.builder.encode_train(alpaca_to_example(row, SHOW_GEN_PREFIX), 1024)
        assert item["input_ids"] == qa["input_ids"] and item["labels"] == qa["labels"]
        question = alpaca_to_example(row).messages[-1]["content"]
        assert item["gen_input_ids"] == method.gen_row("task0", question, row["output"])["gen_input_ids"]

    # Both terms are logged and add up to the loss; the generation loss is learned down.
    for task_id in (1, 2):
        entries = [
            e for e in json.loads((out / "logs" / f"train_task_{task_id}.json").read_text()) if "loss" in e
        ]
        assert all(e["loss"] == pytest.approx(e["loss_qa"] + e["loss_gen"], rel=1e-5) for e in entries)
        assert all(e["loss_gen"] > 0 for e in entries)
    first = [e for e in json.loads((out / "logs" / "train_task_1.json").read_text()) if "loss" in e]
    assert first[-1]["loss_gen"] < 0.8 * first[0]["loss_gen"]

    # The learned tasks (and their rows' token limits) are saved with each task.
    state1 = json.loads((out / "task_1" / STATE_FILE).read_text())
    state2 = json.loads((out / "task_2" / STATE_FILE).read_text())
    assert list(state1["learned"]) == ["task0"] and list(state2["learned"]) == ["task0", "task1"]
    assert state2["trained_with"] == rows and state2["summary"]["task1"]["rows_of"] == counts

    # Resumed before task 2 was saved as trained: the written rows are reused, not written again.
    state = json.loads((out / "state.json").read_text())
    state["trained"], state["finished"] = {"1": state["trained"]["1"]}, False
    state["steps"] = {"1": state["steps"]["1"]}
    state["matrix"][2] = [None, None]
    (out / "state.json").write_text(json.dumps(state))
    resumed = Session(parse_config(values))
    sampled = []
    resumed.method.sample = lambda *args, **kwargs: sampled.append(1)
    resumed_seen = record_training_rows(resumed)
    resumed.run()
    assert sampled == [] and resumed_seen[2][1] == mixed

    # One process per task: task 2 continued from the saved task 1 writes the same rows (seeded).
    continued = Session(
        parse_config(
            {
                **values,
                "cl_tasks": "task1",
                "previous_task_model": str(out / "task_1"),
                "current_task_id": 2,
                "output_dir": str(tmp_path / "continued"),
            }
        )
    )
    continued.run(train=True, evaluate=False)
    assert json.loads((tmp_path / "continued" / "pseudo" / "task1.json").read_text()) == rows


def test_the_sample_ratio_sets_the_rows_written_before_a_task(tiny_config, learnable_dir, tmp_path):
    values = run_values(tiny_config, learnable_dir, tmp_path, "run", cl_tasks="task0,task1,task2")
    values["lamol_sample_ratio"] = 0.5
    session = Session(parse_config(values))
    session.load()
    method, (first, second, third) = session.method, session.tasks
    asked = []

    def sample(model, tokenizer, prompt_ids, count, limit, temperature, seed, desc):
        asked.append((tokenizer.decode(prompt_ids), count))
        return [""] * count, [False] * count  # all malformed: nothing to train on

    method.sample = sample
    rows = len(session.data[2].train)
    method.learned = {first.name: 8, second.name: 8}
    method.begin_task(session.model, third, session.data[2])
    share = -(-rows // 2) // 2  # ceil(rows / 2), split over two earlier tasks
    assert share > 0 and asked == [("__gen_task0__", share), ("__gen_task1__", share)]
