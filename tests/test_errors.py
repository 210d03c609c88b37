"""Every user error: one line naming the file and the key or row, exit code 2, no traceback, nothing written."""

import json

import pytest
import yaml

from retain.cli import main

from .conftest import small_tasks, write_task_family


def run_cli(capsys, *args):
    code = main(["run", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.fixture
def case(tmp_path, data_dir, tiny_config):
    """Write a config (and optionally break the data), run it, and check the error contract."""

    def make(capsys, expected: list[str], *, values=None, raw=None, overrides=()):
        config = tmp_path / "case.yaml"
        if raw is not None:
            config.write_text(raw)
        else:
            config.write_text(yaml.safe_dump(tiny_config(**(values or {}))))
        code, lines = run_cli(capsys, config, *overrides)
        assert code == 2, lines
        assert len(lines) == 1, lines
        for fragment in expected:
            assert fragment.replace("{config}", str(config)) in lines[0], lines[0]
        assert not (tmp_path / "run" / "metrics.json").exists()
        assert not (tmp_path / "run" / "state.json").exists(), "an error before training writes no state"
        return lines[0]

    return make


def test_yaml_errors(case, capsys, tmp_path):
    case(capsys, ["{config}", "not valid YAML: line 2"], raw="model_name_or_path: x\nbad: a: b\n")
    case(capsys, ["{config}", "'lora_rnk'", "unknown key"], values={"lora_rnk": 4})
    case(capsys, ["{config}", "'lora_rank'", "expected int"], values={"lora_rank": "four"})
    case(capsys, ["{config}", "'num_train_epochs'", "expected float"], overrides=["num_train_epochs=many"])
    code, lines = run_cli(capsys, tmp_path / "absent.yaml")
    assert code == 2 and "config file not found" in lines[0]


def test_out_of_range_and_methods(case, capsys):
    case(capsys, ["'lora_rank'", "at least 1"], values={"lora_rank": 0})
    case(capsys, ["'replay_buffer_size'", ">= 0"], values={"cl_method": "replay", "replay_buffer_size": -5})
    case(capsys, ["'cl_method'", "unknown method 'ewc'"], values={"cl_method": "ewc"})
    case(capsys, ["'cl_method'", "two methods enabled"], values={"cl_method": "seq", "use_replay": True})


def test_dataset_registry_errors(case, capsys, data_dir):
    case(capsys, ["dataset_info.json", "'nope'", "no dataset entry"], values={"cl_tasks": "task0,nope"})
    info = json.loads((data_dir / "dataset_info.json").read_text())
    del info["task1_test"]
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    case(capsys, ["dataset_info.json", "'task1_test'", "no test split"])


def test_path_traversal(case, capsys, data_dir):
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["task0"]["file_name"] = "../../etc/passwd"
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    case(capsys, ["dataset_info.json", "'task0'", "outside the dataset directory"])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('[{"instruction": "a", ', "malformed JSON"),
        ('[{"instruction": "a"}]', "row 0: missing column 'output'"),
        ("[]", "the dataset is empty"),
        ('{"instruction": "a"}', "expected a list of rows"),
    ],
)
def test_bad_data_files(case, capsys, data_dir, content, expected):
    (data_dir / "task1.json").write_text(content)
    case(capsys, ["task1.json", expected])


def test_bad_jsonl(case, capsys, data_dir):
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["task0"]["file_name"] = "task0.jsonl"
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    (data_dir / "task0.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    case(capsys, ["task0.jsonl", "malformed JSON line 2"])


def test_every_answer_truncated(case, capsys):
    case(capsys, ["'cutoff_len'", "truncated away", "task0"], values={"cutoff_len": 8})


def test_model_errors(case, capsys, tmp_path):
    case(
        capsys,
        ["'model_name_or_path'", "model path not found"],
        values={"model_name_or_path": str(tmp_path / "nomodel")},
    )
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    case(capsys, [str(corrupt), "cannot read GGUF file"], values={"model_name_or_path": str(corrupt)})


def test_unknown_benchmark_order(case, capsys, tmp_path):
    bench = write_task_family(tmp_path / "bench", small_tasks(2))
    (bench / "benchmark_info.json").write_text(json.dumps({"B": {"orders": {"o1": ["task0", "task1"]}}}))
    values = {"cl_tasks": None, "benchmark": "B", "benchmark_order": "o9", "benchmark_dir": str(bench)}
    case(capsys, ["benchmark_info.json", "'benchmark_order'", "no order 'o9'"], values=values)


def test_non_finite_loss_stops_and_keeps_earlier_tasks(tiny_config, tmp_path, capsys, monkeypatch):
    import torch

    from retain.cl.seq import Seq

    original = Seq.compute_loss

    def poisoned(self, model, inputs, scale):
        loss = original(self, model, inputs, scale)
        return loss * float("nan") if self.config.cl.current_task_id == 2 else loss

    monkeypatch.setattr(Seq, "compute_loss", poisoned)
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    code, lines = run_cli(capsys, config)
    errors = [line for line in lines if line.startswith("retain: error")]  # progress bars are on stderr too
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0]
    assert "Traceback" not in "\n".join(lines)
    lines = errors
    assert "non-finite loss" in lines[0] and "task 'task1'" in lines[0] and "step 1" in lines[0]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert list(state["trained"]) == ["1"] and all(v is not None for v in state["matrix"][1])
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert torch.isfinite(torch.tensor(state["matrix"][1])).all()
