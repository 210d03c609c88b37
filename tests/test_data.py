import json
from pathlib import Path

import pytest

from retain.data.prompt import IGNORE_INDEX, PromptBuilder, normalize_answer, pad_batch
from retain.data.registry import load_dataset_info, load_examples
from retain.data.tasks import load_tasks
from retain.errors import DataError
from retain.hparams.args import DataArguments
from retain.model.tiny import build_tiny_tokenizer

from .conftest import SHARED_LNT


def registry(tmp_path, info, files):
    for name, rows in files.items():
        (tmp_path / name).write_text(rows if isinstance(rows, str) else json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return load_dataset_info(tmp_path)


def test_alpaca_with_columns_and_system(tmp_path):
    info = registry(
        tmp_path,
        {
            "t": {
                "file_name": "t.json",
                "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys"},
            }
        },
        {"t.json": [{"q": "Question?", "ctx": "Context.", "a": "Yes", "sys": "Be brief."}]},
    )
    (example,) = load_examples(tmp_path, info, "t")
    assert example.messages == [{"role": "user", "content": "Question?\nContext."}]
    assert example.answer == "Yes" and example.system == "Be brief."


def test_sharegpt(tmp_path):
    conv = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
    ]
    info = registry(
        tmp_path,
        {"t": {"file_name": "t.jsonl", "formatting": "sharegpt"}},
        {"t.jsonl": json.dumps({"conversations": conv}) + "\n"},
    )
    (example,) = load_examples(tmp_path, info, "t")
    assert example.system == "S"
    assert [m["role"] for m in example.messages] == ["user", "assistant", "user"]
    assert example.answer == "4"


def test_answer_only_labels():
    tokenizer = build_tiny_tokenizer()
    builder = PromptBuilder(tokenizer)
    from retain.data.registry import Example

    example = Example(messages=[{"role": "user", "content": "Say hi"}], answer="hi")
    row = builder.encode_train(example, cutoff_len=512)
    prompt = builder.prompt_ids(example)
    assert row["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = row["labels"][len(prompt) :]
    assert tokenizer.decode(answer) == "hi<|im_end|>"
    assert answer[-1] == tokenizer.eos_token_id
    assert row["input_ids"][len(prompt) :] == answer
    # Right truncation cuts the answer, keeping labels aligned.
    short = builder.encode_train(example, cutoff_len=len(prompt) + 1)
    assert len(short["input_ids"]) == len(short["labels"]) == len(prompt) + 1


def test_pad_batch_sides():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    right = pad_batch(rows, pad_id=0)
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = pad_batch(rows, pad_id=0, side="left", keys=("input_ids",))
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]] and "labels" not in left


def test_normalize_answer():
    assert normalize_answer("  Entailment. ") == "entailment"
    assert normalize_answer("Science or Technology!") == "science or technology"
    assert normalize_answer("A") == normalize_answer("a ")


def test_path_traversal_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "secret.json").write_text("[]")
    info = registry(tmp_path / "data", {"t": {"file_name": "../secret.json"}}, {})
    with pytest.raises(DataError, match="outside the dataset directory"):
        load_examples(tmp_path / "data", info, "t")


def test_missing_test_split_and_bad_rows(tmp_path):
    registry(tmp_path, {"t": {"file_name": "t.json"}}, {"t.json": [{"instruction": "i", "output": "o"}]})
    with pytest.raises(DataError, match="no test split: add an entry 't_test'"):
        load_tasks(DataArguments(cl_tasks=["t"], dataset_dir=str(tmp_path)))
    info = registry(tmp_path, {"t": {"file_name": "t.json"}}, {"t.json": [{"instruction": "i"}]})
    with pytest.raises(DataError, match="row 0: missing column 'output'"):
        load_examples(tmp_path, info, "t")
    info = registry(tmp_path, {"t": {"file_name": "t.json"}}, {"t.json": "[{"})
    with pytest.raises(DataError, match="malformed JSON"):
        load_examples(tmp_path, info, "t")
    info = registry(tmp_path, {"t": {"file_name": "t.json"}}, {"t.json": []})
    with pytest.raises(DataError, match="no rows"):
        load_examples(tmp_path, info, "t")


def test_a_byte_order_mark_is_read_past(tmp_path):
    rows = [{"instruction": "i", "output": "o"}]
    (tmp_path / "t.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    (tmp_path / "dataset_info.json").write_bytes(b"\xef\xbb\xbf" + b'{"t": {"file_name": "t.json"}}')
    (example,) = load_examples(tmp_path, load_dataset_info(tmp_path), "t")
    assert example.answer == "o" and example.messages[0]["content"] == "i"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"columns": ["prompt"]}, "'t': 'columns' must map each key to a name (a string, or null)"),
        ({"columns": {"prompt": 3}}, "'t': 'columns' must map each key to a name"),
        ({"columns": {"promt": "q"}}, "'t': unknown 'columns' key 'promt' (known: prompt, query, response, "),
        (
            {"formatting": "sharegpt", "tags": {"role": "from"}},
            "unknown 'tags' key 'role' (known: role_tag, ",
        ),
        ({"formatting": "sharegpt", "tags": "from"}, "'t': 'tags' must map each key to a name"),
    ],
)
def test_columns_and_tags_that_cannot_be_read_are_data_errors(tmp_path, entry, message):
    rows = [{"instruction": "i", "output": "o"}]
    info = registry(tmp_path, {"t": {"file_name": "t.json", **entry}}, {"t.json": rows})
    with pytest.raises(DataError) as error:
        load_examples(tmp_path, info, "t")
    assert message in str(error.value) and str(error.value).startswith(str(tmp_path / "dataset_info.json"))


def test_llamafactory_column_keys_for_other_data_are_accepted_and_not_read(tmp_path):
    rows = [{"q": "i", "a": "o", "imgs": []}]
    columns = {"prompt": "q", "response": "a", "images": "imgs", "query": None}
    info = registry(tmp_path, {"t": {"file_name": "t.json", "columns": columns}}, {"t.json": rows})
    (example,) = load_examples(tmp_path, info, "t")
    assert example.answer == "o" and example.messages[0]["content"] == "i"


def test_json_lines_in_a_json_file(tmp_path):
    rows = [{"instruction": "i", "input": str(n), "output": "o"} for n in range(3)]
    (tmp_path / "t.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    info = registry(tmp_path, {"t": {"file_name": "t.json"}}, {})
    examples = load_examples(tmp_path, info, "t")
    assert [e.messages[0]["content"] for e in examples] == ["i\n0", "i\n1", "i\n2"]


def test_the_shipped_lnt_copy_loads_with_no_benchmark_dir(tmp_path):
    from retain.data.builtin import shipped_benchmark

    folder = shipped_benchmark("LNT")
    orders = json.loads((folder / "benchmark_info.json").read_text())["LNT"]["orders"]
    assert set(orders) == {"order1", "order2", "order3", "standard", "short1", "short2"}
    tasks = load_tasks(DataArguments(benchmark="LNT", benchmark_order="order1"))
    assert [t.name for t in tasks] == orders["order1"] and len(tasks) == 14
    by_name = {t.name: t for t in tasks}
    assert len(by_name["agnews"].train) == 3800 and len(by_name["agnews"].test) == 7600
    assert by_name["MNLI"].labels == ["contradiction", "entailment", "neutral"]
    assert by_name["COPA"].labels == ["a", "b"] and len(by_name["dbpedia"].labels) == 14
    for order in orders:
        load_tasks(DataArguments(benchmark="LNT", benchmark_order=order, max_samples=1, eval_max_samples=1))
    with pytest.raises(DataError, match="no order 'nope'"):
        load_tasks(DataArguments(benchmark="LNT", benchmark_order="nope"))
    with pytest.raises(DataError, match=r"no benchmark 'NOPE' ships with retain \(shipped: LNT\)") as info:
        load_tasks(DataArguments(benchmark="NOPE", benchmark_order="o1", dataset_dir=str(tmp_path)))
    assert info.value.field == "benchmark"
    dev = load_tasks(DataArguments(benchmark="LNT", benchmark_order="short1", eval_split="dev"))
    for task in dev:  # dev rows are cut from the train file: never trained on
        train = {(e.messages[0]["content"], e.answer) for e in by_name[task.name].train}
        assert task.test and not train & {(e.messages[0]["content"], e.answer) for e in task.test}


@pytest.mark.skipif(not SHARED_LNT.is_dir(), reason="needs ../shared/benchmarks/LNT")
def test_the_shipped_lnt_copy_is_built_from_the_source_by_our_script(tmp_path):
    import importlib.util

    from retain.data.builtin import shipped_benchmark

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "build_lnt.py"
    spec = importlib.util.spec_from_file_location("build_lnt", script)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.build(SHARED_LNT, tmp_path)
    shipped = shipped_benchmark("LNT")
    for path in sorted(tmp_path.rglob("*")):  # the committed copy is what the script builds, byte for byte
        if path.is_file():
            assert path.read_bytes() == (shipped / path.relative_to(tmp_path)).read_bytes(), path
    source = load_dataset_info(SHARED_LNT)
    info = load_dataset_info(shipped)
    for name in [n for n in source if not n.endswith("_test")]:
        original = load_examples(SHARED_LNT, source, name)
        train, dev = load_examples(shipped, info, name), load_examples(shipped, info, f"{name}_dev")
        assert load_examples(shipped, info, f"{name}_test") == load_examples(
            SHARED_LNT, source, f"{name}_test"
        )
        half = len(original) // 2
        assert train[:half] == original[:half]  # the first half keeps its order: short runs train as before
        assert sorted(map(repr, train + dev)) == sorted(map(repr, original))
        assert len(dev) == min(200, len(original) // 10)


def test_llamafactory_template_names():
    from retain.data.registry import Example
    from retain.data.templates import CHAT_FAMILIES, TEXT_FORMATS, resolve_format
    from retain.hparams.args import TEMPLATE_NAMES

    assert set(TEMPLATE_NAMES) == {"auto", *TEXT_FORMATS, *CHAT_FAMILIES}
    tokenizer = build_tiny_tokenizer()  # its own chat template is ChatML
    own = tokenizer.chat_template
    assert resolve_format("chatml", own).own and resolve_format("qwen", own).own
    assert resolve_format("auto", own).own and resolve_format("phi", own).own  # unknown names: auto
    assert not resolve_format("llama3", own).own and resolve_format("alpaca", own).text == "alpaca"
    assert resolve_format("llama3", None).chat_template == CHAT_FAMILIES["llama3"][1]
    assert resolve_format("auto", None).text == "plain"

    example = Example(messages=[{"role": "user", "content": "Q"}], answer="A", system="S")
    expected = {
        "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n",
        "mistral": "<s>[INST] S\n\nQ [/INST]",
        "alpaca": "S\n\n### Instruction:\nQ\n\n### Response:\n",
        "default": "System: S\nHuman: Q\nAssistant: ",
        "empty": "SQ",
    }
    for name, text in expected.items():
        assert PromptBuilder(tokenizer, name).prompt_text(example) == text, name
    qwen = PromptBuilder(tokenizer, "qwen")  # the tokenizer's own (ChatML) template, so no default system
    assert qwen.prompt_text(Example(messages=[{"role": "user", "content": "Q"}], answer="A")).startswith(
        "<|im_start|>user"
    )


def test_a_template_without_a_system_role_gets_it_folded_into_the_first_user_turn():
    from retain.data.registry import Example

    tokenizer = build_tiny_tokenizer()
    builder = PromptBuilder(
        tokenizer, "gemma"
    )  # retain's Gemma template raises on a system turn, as Gemma's does
    assert builder.fold_system
    example = Example(messages=[{"role": "user", "content": "Q"}], answer="A", system="S")
    assert builder.prompt_text(example) == (
        "<bos><start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\n"
    )
    assert not PromptBuilder(tokenizer).fold_system


def test_retain_benchmarks_lists_orders_tasks_rows_and_labels(capsys):
    from retain.cli import main

    assert main(["benchmarks"]) == 0
    out = capsys.readouterr().out
    assert (
        "order short1: agnews, SST-2, MNLI, COPA" in out and "order standard: dbpedia, amazon, agnews" in out
    )
    cb = next(line for line in out.splitlines() if line.strip().startswith("CB "))
    assert cb.split()[1:4] == ["225", "25", "56"] and "entailment, contradiction, neutral" in cb


def test_the_wheel_carries_the_benchmark_and_stays_small(tmp_path):
    """After `pip install`, `benchmark: LNT` works: the wheel holds the shipped copy, under 20 MB."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q"]
    result = subprocess.run([*command, "-w", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("retain-*.whl")
    assert wheel.stat().st_size < 20 * 2**20
    names = zipfile.ZipFile(wheel).namelist()
    shipped = [n for n in names if n.startswith("retain/data/benchmarks/LNT/")]
    assert "retain/data/benchmarks/LNT/dataset_info.json" in shipped
    assert len([n for n in shipped if n.endswith(".json.gz")]) == 14 * 3


@pytest.mark.parametrize(
    ("label_list", "message"),
    [
        ([], "'label_list' must be a non-empty list of strings"),
        (["yes", 3], "'label_list' must be a non-empty list of strings"),
        (["maybe", "perhaps"], "no test row of task 'task0' has its answer among 'label_list'"),
        (
            ["yes", "no", " ."],
            "'label_list' entry ' .' is empty once spaces and trailing punctuation are removed",
        ),
        (["yes", ""], "'label_list' entry '' is empty once"),
    ],
)
def test_a_label_list_that_scores_nothing_is_a_data_error(tmp_path, label_list, message):
    from .conftest import small_tasks, write_task_family

    root = write_task_family(tmp_path, small_tasks(1))
    info = json.loads((root / "dataset_info.json").read_text())
    info["task0"]["label_list"] = label_list
    (root / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=message) as error:
        load_tasks(DataArguments(cl_tasks=["task0"], dataset_dir=str(root)))
    assert error.value.field == "task0" and error.value.source.endswith("dataset_info.json")
    info["task0"]["label_list"] = ["YES", "no"]  # labels match after normalisation
    (root / "dataset_info.json").write_text(json.dumps(info))
    assert load_tasks(DataArguments(cl_tasks=["task0"], dataset_dir=str(root)))[0].labels == ["no", "yes"]


def test_train_rows_with_an_empty_answer_are_counted_in_a_warning(tmp_path, caplog):
    from retain.data.tasks import encode_task

    from .conftest import write_task_family

    pairs = [("a", "yes"), ("b", ""), ("c", "  "), ("d", "no"), ("e", "yes"), ("f", "no")]
    root = write_task_family(tmp_path, {"task0": ("Answer yes or no.", pairs)}, test_rows=2)
    (task,) = load_tasks(DataArguments(cl_tasks=["task0"], dataset_dir=str(root)))
    with caplog.at_level("WARNING", logger="retain.data.tasks"):
        encode_task(task, PromptBuilder(build_tiny_tokenizer()), cutoff_len=256)
    assert "task task0: 2 of 4 train rows have an empty answer" in caplog.text
    assert len(task.train_rows) == 4  # kept: the end-of-text token is still a label
    caplog.clear()
    task.train = [e for e in task.train if e.answer.strip()]
    encode_task(task, PromptBuilder(build_tiny_tokenizer()), cutoff_len=256)
    assert "empty answer" not in caplog.text
