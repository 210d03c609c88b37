import pytest

from retain.errors import ConfigError
from retain.hparams.parser import load_config, parse_config

BASE = {"model_name_or_path": "tiny-random-llama", "cl_tasks": "a,b", "dataset_dir": "data"}


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(
        tmp_path, "model_name_or_path: tiny-random-llama\ncl_tasks: a,b\nlearning_rate: 1e-4\nlora_rank: 8\n"
    )
    config = load_config(
        path, ["lora_rank=16", "learning_rate=3e-4", "num_train_epochs=2", "lr_scheduler_type=cosine"]
    )
    assert config.finetuning.lora_rank == 16
    assert config.training.learning_rate == pytest.approx(3e-4)
    assert config.training.num_train_epochs == 2.0
    assert config.training.lr_scheduler_type.value == "cosine"
    assert config.data.cl_tasks == ["a", "b"]
    assert config.finetuning.lora_alpha == 32.0  # default: 2 * rank
    assert config.training.output_dir.endswith("cfg")


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "model_name_or_path: x\ncl_tasks: a\nlora_rnk: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (
        str(path) in str(info.value) and "'lora_rnk'" in str(info.value) and "unknown key" in str(info.value)
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lora_rank", "eight", "expected int"),
        ("learning_rate", "fast", "expected float"),
        ("cutoff_len", True, "int"),
    ],
)
def test_wrong_type(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config({**BASE, key: value}, source="cfg.yaml")


def test_out_of_range():
    with pytest.raises(ConfigError, match="'lora_rank': must be at least 1"):
        parse_config({**BASE, "lora_rank": 0})


def test_use_name_is_the_same_as_cl_method():
    a = parse_config({**BASE, "cl_method": "replay", "replay_ratio": 0.5})
    b = parse_config({**BASE, "use_replay": True, "replay_ratio": 0.5})
    assert a.cl.cl_method == b.cl.cl_method == "replay"
    assert a.method_args == b.method_args
    assert parse_config(BASE).cl.cl_method == "seq"


def test_two_methods_is_an_error():
    with pytest.raises(ConfigError, match="two methods enabled"):
        parse_config({**BASE, "cl_method": "seq", "use_replay": True})
    with pytest.raises(ConfigError, match="two methods enabled"):
        parse_config({**BASE, "use_seq": True, "use_replay": True})


def test_unknown_method_and_foreign_key():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        parse_config({**BASE, "cl_method": "nope"})
    with pytest.raises(ConfigError, match="belongs to method 'replay'"):
        parse_config({**BASE, "replay_ratio": 0.3})


def test_training_arguments_pass_through():
    config = parse_config({**BASE, "warmup_steps": 3, "logging_steps": 5, "save_steps": 7, "bf16": False})
    assert config.training.warmup_steps == 3
    assert config.training.save_steps == 7
    assert config.training.save_strategy.value == "steps"  # save_steps alone turns checkpointing on
    assert config.training.report_to in ("none", [])


def test_malformed_and_missing_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML: line 2"):
        load_config(write(tmp_path, "a: 1\nb: c: d\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_tasks_are_required_and_exclusive():
    with pytest.raises(ConfigError, match="no tasks"):
        parse_config({"model_name_or_path": "x"})
    with pytest.raises(ConfigError, match="not both"):
        parse_config({**BASE, "benchmark": "LNT", "benchmark_order": "short1"})


def test_resolved_config_holds_every_group():
    resolved = parse_config({**BASE, "cl_method": "replay"}).resolved()
    for key in (
        "model_name_or_path",
        "cl_tasks",
        "lora_rank",
        "max_new_tokens",
        "cl_method",
        "replay_ratio",
        "learning_rate",
        "seed",
        "output_dir",
    ):
        assert key in resolved
