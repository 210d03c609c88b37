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
    case(capsys, ["'cl_method'", "unknown method 'nope'"], values={"cl_method": "nope"})
    case(
        capsys,
        ["'use_moe'", "the MoE-LoRA method is not available in this version"],
        values={"use_moe": True},
    )
    case(
        capsys, ["'expert_num'", "EasyCL's MoE-LoRA method, which is not available"], values={"expert_num": 4}
    )
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
        (
            '[{"instruction": "a", ',
            "malformed JSON: Expecting property name enclosed in double quotes at line 1",
        ),
        ('[{"instruction": "a', "malformed JSON: Unterminated string starting at line 1, column 18"),
        ('[{"instruction": "a"}]', "row 0: missing column 'output'"),
        ('{"instruction": "a"}', "row 0: missing column 'output'"),  # JSON Lines in a .json file
        ("[]", "the dataset has no rows"),
        ("", "the data file is empty"),
        ("  \n", "the data file is empty"),
        ('"text"', "expected a list of rows"),
    ],
)
def test_bad_data_files(case, capsys, data_dir, content, expected):
    (data_dir / "task1.json").write_text(content)
    line = case(capsys, ["task1.json", expected])
    assert not line.endswith(" at"), line


def test_data_file_that_is_not_utf8(case, capsys, data_dir):
    (data_dir / "task1.json").write_bytes('[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1"))
    case(capsys, ["task1.json", "not a UTF-8 text file (byte 21 is 0xe9)"])


def test_bad_jsonl(case, capsys, data_dir):
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["task0"]["file_name"] = "task0.jsonl"
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    (data_dir / "task0.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    case(capsys, ["task0.jsonl", "malformed JSON: line 2: Expecting property name"])


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

    from retain.cl.seq.method import Seq

    original_loss, original_begin = Seq.compute_loss, Seq.begin_task

    def begin(self, model, task, data):
        self.poison = task.id == 2
        original_begin(self, model, task, data)

    def poisoned(self, model, inputs, scale):
        loss = original_loss(self, model, inputs, scale)
        return loss * float("nan") if self.poison else loss

    monkeypatch.setattr(Seq, "begin_task", begin)
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


def test_output_dir_that_is_a_file(case, capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    case(capsys, ["'output_dir'", "is an existing file, not a folder"], values={"output_dir": str(target)})
    assert target.read_text() == "not a folder"


def test_output_dir_that_cannot_be_written(case, capsys, tmp_path, monkeypatch):
    import errno

    import retain.io

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    # Root ignores file modes, so the read-only file system is injected where the run probes it.
    monkeypatch.setattr(retain.io.tempfile, "TemporaryFile", read_only)
    case(capsys, ["'output_dir'", "cannot write to", "Read-only file system"])


def test_an_output_dir_another_process_is_writing_is_refused(case, capsys, tmp_path):
    import fcntl
    import os

    folder = tmp_path / "run"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)  # as a retain process running there holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        case(capsys, ["'output_dir'", f"{folder} is in use by another retain process"])
    finally:
        os.close(fd)  # the lock goes with the holder: the same config now runs
    assert main(["run", str(tmp_path / "case.yaml")]) == 0
    assert (folder / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        ({"learning_rate": -1}, ["'learning_rate'", "must be > 0"]),
        ({"num_train_epochs": 0}, ["'num_train_epochs'", "no task would be trained"]),
        ({"num_train_epochs": -1}, ["'num_train_epochs'", "no task would be trained"]),
        ({"max_steps": 0}, ["'max_steps'", "positive number of optimizer steps"]),
        ({"learning_rate": float("nan")}, ["'learning_rate'", "must be a finite number, got nan"]),
        ({"max_grad_norm": float("inf")}, ["'max_grad_norm'", "must be a finite number, got inf"]),
        ({"weight_decay": "-inf"}, ["'weight_decay'", "must be a finite number, got '-inf'"]),
        ({"lora_rnk": 4, "lerning_rate": 1}, ["2 keys are not accepted", "did you mean 'lora_rank'"]),
    ],
)
def test_values_that_would_train_nothing(case, capsys, values, fragments):
    case(capsys, ["{config}", *fragments], values=values)


def test_a_run_that_failed_before_training_restarts_with_a_corrected_config(
    tiny_config, tmp_path, capsys, monkeypatch
):
    from retain.cl.seq.method import Seq

    original = Seq.compute_loss

    def diverges_at_high_lr(self, model, inputs, scale):
        loss = original(self, model, inputs, scale)
        return loss * float("inf") if self.config.training.learning_rate >= 1 else loss

    monkeypatch.setattr(Seq, "compute_loss", diverges_at_high_lr)
    config = tmp_path / "lr.yaml"
    config.write_text(yaml.safe_dump(tiny_config(cl_tasks="task0,task1", learning_rate=5)))
    code, lines = run_cli(capsys, config)
    assert code == 2 and "non-finite loss" in lines[-1]
    assert json.loads((tmp_path / "run" / "state.json").read_text())["trained"] == {}
    config.write_text(yaml.safe_dump(tiny_config(cl_tasks="task0,task1", learning_rate=1e-3)))
    code, lines = run_cli(capsys, config)  # no --force needed: nothing was trained
    assert code == 0, lines
    assert any("had trained no task: starting it again" in line for line in lines)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["matrix"]) == 3 and metrics["matrix"][2][1] is not None


def test_wall_time_covers_every_invocation(tiny_config, tmp_path, capsys, monkeypatch):
    import time

    from retain.cl.seq.method import Seq

    original_end = Seq.end_task

    def slow_end(self, model, task, data):  # a measurable amount of work per task
        time.sleep(1.0)
        original_end(self, model, task, data)

    def stop_after_task_1(self, model, task, data):
        slow_end(self, model, task, data)
        if task.id == 1:
            raise KeyboardInterrupt

    config = tmp_path / "w.yaml"
    config.write_text(yaml.safe_dump(tiny_config(cl_tasks="task0,task1")))
    monkeypatch.setattr(Seq, "end_task", stop_after_task_1)
    assert run_cli(capsys, config)[0] == 130  # interrupted at the end of task 1, before it was saved
    first = json.loads((tmp_path / "run" / "state.json").read_text())
    assert first["trained"] == {}
    monkeypatch.setattr(Seq, "end_task", slow_end)
    assert run_cli(capsys, config)[0] == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # The interrupted invocation's time is kept (its second in task 1), and the second invocation's
    # two seconds (task 1 again, task 2) are added to it.
    assert first["wall_time_s"] >= 1.0
    assert metrics["wall_time_s"] >= first["wall_time_s"] + 2.0


def test_methods_that_keep_whole_weights_refuse_sharded_parameters(tmp_path):
    from types import SimpleNamespace

    from retain.cl.registry import load_method
    from retain.errors import ConfigError
    from retain.training.sequence import check_sharding, shards_parameters

    stage3, stage2 = tmp_path / "z3.json", tmp_path / "z2.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))

    def config(deepspeed=None, fsdp=""):
        return SimpleNamespace(training=SimpleNamespace(deepspeed=deepspeed, fsdp=fsdp))

    assert shards_parameters(config(str(stage3)).training) and shards_parameters(
        config(fsdp="full_shard").training
    )
    assert not shards_parameters(config(str(stage2)).training) and not shards_parameters(config().training)
    assert shards_parameters(config({"zero_optimization": {"stage": 3}}).training)
    for name in ("ilora", "ewc", "lwf", "olora", "nlora", "inflora", "gem", "agem", "multitask"):
        method = SimpleNamespace(name=name, sharding_limit=load_method(name).sharding_limit)
        assert method.sharding_limit, name
        with pytest.raises(
            ConfigError, match=f"cl_method {name} cannot train with sharded parameters"
        ) as err:
            check_sharding(config(str(stage3)), method)
        assert err.value.field == "deepspeed"
        check_sharding(config(str(stage2)), method)  # ZeRO-2 keeps whole parameters on every process
    for name in ("seq", "replay"):
        assert load_method(name).sharding_limit is None
