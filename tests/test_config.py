import pytest

from retain.cl.registry import load_config, parse_config
from retain.errors import ConfigError

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
    with pytest.raises(ConfigError, match="belongs to methods 'gem', 'replay'"):
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


def test_a_key_given_twice_is_an_error_not_the_last_wins(tmp_path):
    from retain.hparams.parser import read_yaml

    twice = "model_name_or_path: x\nlora_rank: 4\ncl_tasks: a\nlora_rank: 8\n"
    with pytest.raises(
        ConfigError, match=r"line 4, column 1: the key 'lora_rank' is given twice \(first on line 2\)"
    ):
        load_config(write(tmp_path, twice))
    with pytest.raises(ConfigError, match="the key 'x' is given twice"):
        read_yaml(write(tmp_path, "a: {x: 1, x: 2}\n"))
    # A merged mapping's keys may still be overridden.
    merged = read_yaml(write(tmp_path, "base: &b {lora_rank: 4, seed: 1}\nrun:\n  <<: *b\n  lora_rank: 8\n"))
    assert merged["run"] == {"lora_rank": 8, "seed": 1}


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


def test_several_unknown_keys_in_one_error_with_the_closest_key():
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "lora_rnk": 8, "lerning_rate": 1e-4, "zzz_nothing": 1}, source="cfg.yaml")
    message = str(info.value)
    assert message.startswith("cfg.yaml: 3 keys are not accepted")
    assert "'lora_rnk': unknown key (did you mean 'lora_rank'?)" in message
    assert "'lerning_rate': unknown key (did you mean 'learning_rate'?)" in message
    assert "'zzz_nothing': unknown key (see `retain keys`" in message and message.count("did you mean") == 2
    with pytest.raises(ConfigError) as info:  # one key: the usual 'FILE: KEY: message' form
        parse_config({**BASE, "lora_rnk": 8}, source="cfg.yaml")
    assert info.value.field == "lora_rnk" and "did you mean 'lora_rank'" in str(info.value)


def test_a_config_that_names_no_method_runs_seq_and_says_so():
    config = parse_config(BASE)
    assert config.cl.cl_method == "seq"
    assert any("no method named" in note and "'seq'" in note for note in config.notes)
    assert not any("no method named" in note for note in parse_config({**BASE, "cl_method": "seq"}).notes)


def test_easycl_methods_retain_lacks_are_named():
    with pytest.raises(ConfigError, match="the ABSCL method is not available in this version") as info:
        parse_config({**BASE, "use_abscl": True})
    assert info.value.field == "use_abscl"
    with pytest.raises(ConfigError, match="a key of EasyCL's Dynamic ConPet method"):
        parse_config({**BASE, "classification_loss_weight": 0.5})
    # A switch that is off asks for nothing.
    assert parse_config({**BASE, "use_abscl": False}).cl.cl_method == "seq"


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"learning_rate": -1}, "learning_rate", "must be > 0"),
        ({"learning_rate": 0}, "learning_rate", "must be > 0"),
        ({"num_train_epochs": 0}, "num_train_epochs", "no task would be trained"),
        ({"num_train_epochs": -1}, "num_train_epochs", "no task would be trained"),
        ({"max_steps": 0}, "max_steps", "positive number of optimizer steps"),
        ({"max_steps": -5}, "max_steps", "positive number of optimizer steps"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size", "at least 1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps", "at least 1"),
        ({"stage": "dpo"}, "stage", "only 'sft'"),
        ({"warmup_ratio": 0.1, "warmup_steps": 5}, "warmup_ratio", "not both"),
        ({"warmup_ratio": 2}, "warmup_ratio", r"must be in \[0, 1\), got 2.0"),
        ({"warmup_ratio": 1}, "warmup_ratio", r"must be in \[0, 1\), got 1.0"),
        ({"seed": -1}, "seed", r"must be in \[0, 2\*\*32 - 1\], got -1"),
        ({"data_seed": 2**32}, "data_seed", r"must be in \[0, 2\*\*32 - 1\]"),
        (
            {"lr_scheduler_type": "cosinus"},
            "lr_scheduler_type",
            "expected 'linear' or 'cosine' or .*got 'cosinus'",
        ),
        ({"optim": "adam"}, "optim", "expected 'adamw_torch' or .*got 'adam'"),
        ({"dataset": "x,y"}, "dataset", "differ"),
    ],
)
def test_values_that_train_nothing_or_contradict(values, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_config({**BASE, **values}, source="cfg.yaml")
    assert info.value.field == field
    # max_steps alone decides when it is set: epochs 0 then train nothing extra and are fine.
    assert parse_config({**BASE, "num_train_epochs": 0, "max_steps": 3}).training.max_steps == 3


def test_llamafactory_keys_are_honoured_or_noted():
    easycl = {
        "model_name_or_path": "tiny-random-llama",
        "stage": "sft",
        "do_train": True,
        "dataset": "a,b",
        "template": "llama3",
        "overwrite_cache": True,
        "preprocessing_num_workers": 16,
        "dataloader_num_workers": 0,
        "plot_loss": True,
        "overwrite_output_dir": True,
        "save_only_model": False,
        "trust_remote_code": True,
        "ddp_timeout": 180000000,
        "warmup_ratio": 0.1,
        "val_size": 0.1,
        "eval_strategy": "steps",
        "resume_from_checkpoint": None,
        "lr_scheduler_type": "cosine",
    }
    config = parse_config(easycl)
    assert config.data.cl_tasks == ["a", "b"]  # dataset: the task sequence
    assert config.training.warmup_steps == pytest.approx(0.1)  # a float in [0, 1): a share of the steps
    assert config.training.ddp_timeout == 180000000 and config.cl.plot_loss is True
    assert config.data.template == "llama3"
    notes = "\n".join(config.notes)
    for noted in (
        "overwrite_cache",
        "preprocessing_num_workers",
        "overwrite_output_dir",
        "val_size",
        "eval_strategy",
    ):
        assert f"'{noted}'" in notes
    assert "'trust_remote_code': accepted, but retain never runs code" in notes
    assert (
        "save_only_model" not in notes and "resume_from_checkpoint" not in notes
    )  # false / null ask nothing
    assert config.training.eval_strategy.value == "no"
    assert config.training.save_only_model is False
    assert "'template'" not in notes
    assert "not a template retain knows" in "\n".join(parse_config({**easycl, "template": "phi"}).notes)


def test_half_precision_without_a_gpu_falls_back_and_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without a bf16 GPU")
    config = parse_config({**BASE, "bf16": True})
    assert config.training.bf16 is False
    assert any("'bf16'" in note and "float32" in note for note in config.notes)
