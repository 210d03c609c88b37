import subprocess
import sys


def retain_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "retain", *args], capture_output=True, text=True, cwd=cwd)


def test_user_error_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: tiny-random-llama\ncl_tasks: a\nlora_rnk: 4\n")
    result = retain_cli("run", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0] and "'lora_rnk'" in lines[0]
    assert "Traceback" not in result.stderr


def test_override_error_and_missing_config(tmp_path):
    result = retain_cli("run", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr
    result = retain_cli("train")  # the overrides are optional: only the config is named as missing
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "the following arguments are required: config"
    )
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: tiny-random-llama\ncl_tasks: a\n")
    result = retain_cli("run", str(config), "lora_rank=zero")
    assert result.returncode == 2 and "'lora_rank': expected int" in result.stderr


def test_methods_keys_and_models_list():
    assert "seq" in retain_cli("methods").stdout and "replay" in retain_cli("methods").stdout
    keys = retain_cli("keys", "replay").stdout
    assert "lora_rank" in keys and "replay_ratio" in keys
    models = retain_cli("models").stdout
    assert "tiny-random-llama" in models and "smollm2-135m-instruct" in models


def test_run_twice_says_nothing_to_do(tiny_config, tmp_path):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(cl_tasks="task0,task1")))
    first = retain_cli("run", str(config))
    assert first.returncode == 0, first.stderr
    assert "last=" in first.stdout
    # The console holds retain's own lines: no library's warnings (DeepSpeed logs to stdout).
    for stream in (first.stdout, first.stderr):
        assert "[WARNING]" not in stream and "Warning:" not in stream and "kernels" not in stream
    second = retain_cli("run", str(config))
    assert second.returncode == 0 and "nothing to do" in second.stdout
    changed = retain_cli("run", str(config), "lora_rank=8")
    assert changed.returncode == 2 and "lora_rank" in changed.stderr
