"""pseudo_replay and the shared rehearsal helpers: the text format by hand, the counts, the mixing,
the files, reuse on resume, and `num_samples_per_task: 0` against seq."""

import json
import random
import re

import pytest
import torch

from retain.cl.pseudo_replay import PseudoReplayArguments
from retain.cl.registry import parse_config
from retain.cl.rehearsal.files import STATE_FILE, PseudoFiles
from retain.cl.rehearsal.rows import (
    FEW_SHOT_HEADER,
    alpaca_identity,
    alpaca_to_example,
    derived_seed,
    example_to_alpaca,
    few_shot_prompt,
    few_shot_request,
    keep_well_formed,
    parse_few_shot_completion,
)
from retain.data.registry import Example
from retain.errors import ConfigError, ModelError
from retain.model.adapters import adapter_parameters, tuner_layers
from retain.training.sequence import Session

# ---- the text format, by hand --------------------------------------------------------------------------


def test_alpaca_rows_round_trip_through_examples():
    with_input = Example(
        messages=[{"role": "user", "content": "Classify.\nitem 3\nmore"}],
        answer="yes",
        extra={"instruction": "Classify."},
    )
    assert example_to_alpaca(with_input) == {
        "instruction": "Classify.",
        "input": "item 3\nmore",
        "output": "yes",
    }
    alone = Example(
        messages=[{"role": "user", "content": "Say hi."}], answer="hi", extra={"instruction": "Say hi."}
    )
    assert example_to_alpaca(alone) == {"instruction": "Say hi.", "input": "", "output": "hi"}
    # sharegpt rows keep no instruction: the user turn splits at its first newline.
    chat = Example(messages=[{"role": "user", "content": "a\nb\nc"}], answer="d")
    assert example_to_alpaca(chat) == {"instruction": "a", "input": "b\nc", "output": "d"}
    for example in (with_input, alone, chat):
        back = alpaca_to_example(example_to_alpaca(example))
        assert back.messages == example.messages and back.answer == example.answer  # the same question
    prefixed = alpaca_to_example({"instruction": "Say hi.", "input": "", "output": "hi"}, prefix="(p) ")
    assert prefixed.messages == [{"role": "user", "content": "(p) Say hi."}]


def test_few_shot_prompt_text():
    shots = [
        {"instruction": "Task 0.", "input": "item 1", "output": "yes"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    assert few_shot_prompt(shots) == (
        FEW_SHOT_HEADER + "Instruction: Task 0.\nInput: item 1\nOutput: yes\n\n"
        "Instruction: Say hi.\nInput: <noinput>\nOutput: hi\n\nInstruction:"
    )


def test_few_shot_request_allows_twice_the_longest_shot_block():
    from retain.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    short = {"instruction": "Say hi.", "input": "", "output": "hi"}
    long = {"instruction": "Task 0.", "input": "item one two three four five six", "output": "yes"}
    prompt, limit = few_shot_request(tokenizer, [short, long])
    assert prompt == tokenizer(few_shot_prompt([short, long]))["input_ids"]
    long_block = tokenizer(
        "Instruction: Task 0.\nInput: item one two three four five six\nOutput: yes\n\n",
        add_special_tokens=False,
    )["input_ids"]
    assert limit == 2 * len(long_block) and few_shot_request(tokenizer, [short])[1] < limit


@pytest.mark.parametrize(
    ("text", "finished", "need_output", "expected"),
    [
        (
            " Task 0.\nInput: item 7\nOutput: yes\n\nInstruction: more",
            False,
            True,
            ("Task 0.", "item 7", "yes"),
        ),
        (
            " Task 0.\nInput: item 7\nOutput: yes\nInstruction: next",
            False,
            True,
            ("Task 0.", "item 7", "yes"),
        ),
        (" Say hi.\nInput: <noinput>\nOutput: hi", True, True, ("Say hi.", "", "hi")),  # stopped by itself
        (" Task 0.\nInput: item 7\nOutput: ye", False, True, None),  # cut at the token limit
        (" Task 0.\nOutput: yes\n\n", True, True, None),  # no input field
        (" Task 0.\nInput: item 7\n\n", True, True, None),  # no output field
        (" \nInput: item 7\nOutput: yes\n\n", True, True, None),  # empty instruction
        (" Task 0.\nInput: item 7\nOutput: \n\n", True, True, None),  # empty output
        (" Task 0.\nInput: item 7\nOutput: \n\n", True, False, ("Task 0.", "item 7", "")),  # ssr: inputs only
        ("garbage", True, True, None),
    ],
)
def test_few_shot_completion_parser(text, finished, need_output, expected):
    parsed = parse_few_shot_completion(text, finished, need_output)
    if expected is None:
        assert parsed is None
    else:
        assert parsed == dict(zip(("instruction", "input", "output"), expected, strict=True))


def test_malformed_and_repeated_rows_are_dropped_and_counted():
    a = {"instruction": "i", "input": "x", "output": "1"}
    b = {"instruction": "i", "input": "y", "output": "1"}
    kept, counts = keep_well_formed([a, None, b, dict(a), None, None], alpaca_identity)
    assert kept == [a, b]
    assert counts == {"generated": 6, "malformed": 3, "duplicates": 1, "kept": 2}
    assert keep_well_formed([], alpaca_identity) == (
        [],
        {"generated": 0, "malformed": 0, "duplicates": 0, "kept": 0},
    )


def test_derived_seeds_are_stable_and_distinct():
    assert derived_seed(0, "lamol", "task1") == derived_seed(0, "lamol", "task1")
    seeds = {derived_seed(s, m, t) for s in (0, 1) for m in ("a", "b") for t in ("x", "y")}
    assert len(seeds) == 8 and all(0 <= s < 2**31 for s in seeds)


# ---- config --------------------------------------------------------------------------------------------


def test_arguments_defaults_and_checks():
    args = PseudoReplayArguments()
    assert (args.num_samples_per_task, args.generation_temperature, args.num_shots) == (200, 1.0, 5)
    assert args.base_model_path is None and args.pseudo_samples_dir is None and args.generate_for_last_task
    base = {"model_name_or_path": "tiny-random-llama", "cl_tasks": "a"}
    config = parse_config(
        {**base, "use_pseudo_replay": True, "base_model_path": "x", "pseudo_samples_dir": "p"}
    )
    assert config.cl.cl_method == "pseudo_replay" and config.method_args.base_model_path == "x"
    for key, value in (("num_samples_per_task", -1), ("generation_temperature", 0.0), ("num_shots", 0)):
        with pytest.raises(ConfigError) as info:
            parse_config({**base, "cl_method": "pseudo_replay", key: value})
        assert info.value.field == key
    # ssr's own keys are not pseudo_replay's (the shared names are declared by both).
    with pytest.raises(ConfigError, match="belongs to method 'ssr'") as info:
        parse_config({**base, "cl_method": "pseudo_replay", "n_clusters": 3})
    assert info.value.field == "n_clusters"


# ---- runs ----------------------------------------------------------------------------------------------


def stub_base_model(method, malformed_every=3):
    """Replace the base model's sampling with written blocks of the prompt's task (every
    `malformed_every`-th one garbage, one repeat); record each call."""
    calls = []

    def sample(model, tokenizer, prompt_ids, count, max_new_tokens, temperature, seed, desc):
        prompt = tokenizer.decode(prompt_ids)
        instruction = re.search(r"Instruction: (.*)\n", prompt).group(1)
        answer = re.search(r"Output: (.*)\n", prompt).group(1)
        adapters_off = all(layer.disable_adapters for layer in tuner_layers(model))
        calls.append(
            {"prompt": prompt, "count": count, "temperature": temperature, "adapters_off": adapters_off}
        )
        texts = []
        for i in range(count):
            if i % malformed_every == malformed_every - 1:
                texts.append("no fields here")
            else:
                texts.append(
                    f" {instruction}\nInput: new item {min(i, 4)}\nOutput: {answer}\n\nInstruction: next"
                )
        return texts, [True] * count

    method.sample = sample
    return calls


def record_training_rows(session):
    seen = {}
    original = session.method.training_rows

    def record(task, rows):
        mixed = original(task, rows)
        seen[task.id] = (rows, mixed)
        return mixed

    session.method.training_rows = record
    return seen


def run_values(tiny_config, learnable_dir, tmp_path, name, **overrides):
    values = tiny_config(
        dataset_dir=str(learnable_dir),
        output_dir=str(tmp_path / name),
        learning_rate=1e-2,
        num_train_epochs=2,
        max_new_tokens=4,
        cl_method="pseudo_replay",
        num_samples_per_task=9,
        num_shots=2,
        generation_temperature=0.7,
    )
    values.update(overrides)
    return values


def test_rows_are_written_mixed_saved_and_continued(tiny_config, learnable_dir, tmp_path):
    copies = tmp_path / "easycl_samples"
    values = run_values(tiny_config, learnable_dir, tmp_path, "run", pseudo_samples_dir=str(copies))
    session = Session(parse_config(values))
    calls = stub_base_model(session.method)
    seen = record_training_rows(session)
    metrics = session.run()
    out = tmp_path / "run"
    assert len(metrics["matrix"]) == 4

    # One generation per finished task, from the base model (adapters off), with 2 real shots of the task.
    assert [c["count"] for c in calls] == [9, 9, 9] and all(c["adapters_off"] for c in calls)
    assert all(c["temperature"] == 0.7 for c in calls)
    for task_id, call in enumerate(calls):
        assert call["prompt"].count("Instruction:") == 3 and f"Task {task_id}." in call["prompt"]

    # 9 written: every third garbage (3 malformed), items 4..8 repeat item 4 (2 duplicates): 4 kept.
    summary = json.loads((out / "pseudo" / "summary.json").read_text())
    for name in ("task0", "task1", "task2"):
        counts = summary[name]["rows_of"][name]
        assert counts == {"generated": 9, "malformed": 3, "duplicates": 2, "kept": 4}
        assert summary[name]["seconds"] >= 0
        rows = json.loads((out / "pseudo" / f"{name}.json").read_text())
        assert [r["input"] for r in rows] == ["new item 0", "new item 1", "new item 3", "new item 4"]
        assert rows == json.loads((copies / f"{name}.json").read_text())  # EasyCL's folder gets a copy
    info = json.loads((out / "pseudo" / "dataset_info.json").read_text())
    assert info["task1"] == {"file_name": "task1.json", "formatting": "alpaca"}

    # Task k trains on its 16 rows plus the 4 kept rows of every earlier task, encoded like train rows.
    builder = session.method.builder
    for task_id, earlier in ((1, []), (2, ["task0"]), (3, ["task0", "task1"])):
        own, mixed = seen[task_id]
        assert len(own) == 16 and mixed[:16] == own
        expected = [
            builder.encode_train(alpaca_to_example(r), 1024)
            for name in earlier
            for r in json.loads((out / "pseudo" / f"{name}.json").read_text())
        ]
        assert mixed[16:] == expected
    # Rows of the replayed task answer like its real rows do.
    assert session.method.memory["task1"][0] == {
        "instruction": "Task 1.",
        "input": "new item 0",
        "output": "red",
    }

    # The memory is saved with each task; a run continued from task 2 trains task 3 on the same rows.
    state = json.loads((out / "task_2" / STATE_FILE).read_text())
    assert list(state["memory"]) == ["task0", "task1"] and state["method"] == "pseudo_replay"
    continued = Session(
        parse_config(
            {
                **values,
                "cl_tasks": "task2",
                "previous_task_model": str(out / "task_2"),
                "current_task_id": 3,
                "output_dir": str(tmp_path / "continued"),
            }
        )
    )
    stub_base_model(continued.method)
    continued_seen = record_training_rows(continued)
    continued.run(train=True, evaluate=False)
    assert continued_seen[3][1] == seen[3][1]
    # A task directory of another method is a clear error naming the file.
    (out / "task_2" / STATE_FILE).unlink()
    broken = Session(
        parse_config(
            {
                **values,
                "previous_task_model": str(out / "task_2"),
                "current_task_id": 3,
                "cl_tasks": "task2",
                "output_dir": str(tmp_path / "broken"),
            }
        )
    )
    broken.load()
    with pytest.raises(ModelError, match="pseudo_replay state not found") as info:
        broken.restore(0)
    assert info.value.source.endswith(STATE_FILE)


def test_a_resumed_run_reuses_the_written_rows(tiny_config, learnable_dir, tmp_path):
    values = run_values(tiny_config, learnable_dir, tmp_path, "run", cl_tasks="task0,task1")
    session = Session(parse_config(values))
    stub_base_model(session.method)
    first = record_training_rows(session)
    session.run()
    out = tmp_path / "run"
    # Pretend the run stopped after task 1's rows were written but before task 1 was saved as trained.
    state = json.loads((out / "state.json").read_text())
    state["trained"], state["steps"], state["finished"] = {}, {}, False
    state["matrix"] = [state["matrix"][0], [None, None], [None, None]]
    (out / "state.json").write_text(json.dumps(state))
    files = PseudoFiles(out)
    written = json.loads(files.path("task0").read_text())

    resumed = Session(parse_config(values))
    calls = stub_base_model(resumed.method)
    second = record_training_rows(resumed)
    resumed.run()
    assert calls == [], "the written rows are reused, not generated again"
    assert resumed.method.memory["task0"] == written
    assert second[2][1] == first[2][1]

    # Other settings write other rows: a changed file is not taken for the new run's.
    changed = Session(parse_config({**values, "num_samples_per_task": 5, "output_dir": str(out)}), force=True)
    changed_calls = stub_base_model(changed.method)
    changed.load()
    changed.train_task(changed.tasks[0], changed.data[0])
    assert [c["count"] for c in changed_calls] == [5]


def test_the_last_task_writes_no_rows_when_told(tiny_config, learnable_dir, tmp_path):
    values = run_values(tiny_config, learnable_dir, tmp_path, "run", generate_for_last_task=False)
    session = Session(parse_config(values))
    session.load()
    calls = stub_base_model(session.method)
    method, (first, *_, last) = session.method, session.tasks
    method.end_task(session.model, last, session.data[-1])
    assert calls == [] and method.memory == {last.name: []}
    method.end_task(session.model, first, session.data[0])
    assert [c["count"] for c in calls] == [9] and len(method.memory[first.name]) == 4


def test_no_samples_is_exactly_seq(tiny_config, learnable_dir, tmp_path):
    runs = {}
    for name, overrides in (("seq", {"cl_method": "seq"}), ("zero", {"num_samples_per_task": 0})):
        values = run_values(tiny_config, learnable_dir, tmp_path, name, cl_tasks="task0,task1", **overrides)
        if name == "seq":
            values = {k: v for k, v in values.items() if k not in PseudoReplayArguments.__dataclass_fields__}
        session = Session(parse_config(values))
        runs[name] = (session, session.run())
    (seq, seq_metrics), (zero, zero_metrics) = runs["seq"], runs["zero"]
    assert zero_metrics["matrix"] == seq_metrics["matrix"]
    assert max(v for row in seq_metrics["matrix"] for v in row) > 0
    a, b = adapter_parameters(seq.model, "default"), adapter_parameters(zero.model, "default")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generation_is_seeded_and_leaves_the_global_random_state(tiny_config):
    from retain.eval.predict import Sampling, generate_answers
    from retain.model.tiny import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    prompts = [tokenizer("Write a row:")["input_ids"]] * 6
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    draw = lambda seed, size=4: generate_answers(  # noqa: E731
        model,
        tokenizer,
        prompts,
        size,
        12,
        sampling=Sampling(temperature=1.0, seed=seed),
        return_finished=True,
    )
    texts, finished = draw(5)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert (texts, finished) == draw(5)
    assert texts != draw(6)[0]
    assert len(set(texts)) > 1, "identical prompts still give different rows"
    # Greedy stays the default (a list of answers), and `finished` tells the token limit apart.
    greedy = generate_answers(model, tokenizer, prompts, 4, 12)
    assert isinstance(greedy, list) and len(set(greedy)) == 1
    _, short = generate_answers(model, tokenizer, prompts, 4, 1, return_finished=True)
    assert short == [False] * 6


def test_the_base_model_is_the_run_model_without_adapters_unless_another_is_named(tiny_config):
    same = Session(parse_config(tiny_config(cl_method="pseudo_replay", base_model_path="tiny-random-llama")))
    same.load()
    with same.method.base_model(same.model) as (model, tokenizer):
        assert model is same.model and tokenizer is same.tokenizer
        assert all(layer.disable_adapters for layer in tuner_layers(model))
    assert not any(layer.disable_adapters for layer in tuner_layers(same.model))

    other = Session(parse_config(tiny_config(cl_method="pseudo_replay", base_model_path="tiny-random-qwen2")))
    other.load()
    with other.method.base_model(other.model) as (first, _):
        assert first is not other.model and type(first).__name__ == "Qwen2ForCausalLM"
        assert not any(p.requires_grad for p in first.parameters())
    with other.method.base_model(other.model) as (second, _):
        assert second is first  # loaded once
