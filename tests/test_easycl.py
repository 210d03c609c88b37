"""An EasyCL user switches in one command: EasyCL-shaped configs run unchanged (but for paths that do not
exist here), and `retain cl_workflow` takes EasyCL's command line."""

import json
from pathlib import Path

import pytest
import yaml

from retain.cl.registry import method_specs
from retain.cli import main
from retain.io import exclusive_use

CONFIGS = Path(__file__).parent / "easycl"


def localised(name: str, data_dir: Path, out: Path) -> Path:
    """The EasyCL config with only its paths changed: model, dataset names and folder, output folder."""
    text = (CONFIGS / f"{name}.yaml").read_text()
    text = text.replace("meta-llama/Meta-Llama-3-8B-Instruct", "tiny-random-llama")
    text = text.replace("dataset: task_a,task_b", f"dataset: task0,task1\ndataset_dir: {data_dir}")
    text = text.replace("saves/llama3-8b/lora/", f"{out}/")
    path = out / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_there_is_an_easycl_config_for_every_method():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert set(method_specs()) - {"seq"} <= names and "lora" in names  # `lora`: EasyCL's plain run (seq)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_easycl_config_runs_unchanged(name, data_dir, tmp_path, capsys):
    config = localised(name, data_dir, tmp_path)
    code, out, err = cli(capsys, "run", config)
    assert code == 0, err
    assert "last=" in out
    run_dir = tmp_path / f"{name}_sft"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == ("seq" if name == "lora" else name)
    assert (run_dir / "loss_curve.png").is_file()  # plot_loss: true is honoured
    # Keys that do not apply are accepted with a one-line note each; bf16 falls back on a CPU.
    for key in ("overwrite_cache", "preprocessing_num_workers", "overwrite_output_dir", "trust_remote_code"):
        assert f"retain: note: '{key}'" in err
    assert "retain: note: 'bf16'" in err or "cuda" in err
    if name == "lora":
        assert "no method named" in err and "running 'seq'" in err
    assert "Traceback" not in err and "FutureWarning" not in err and "UserWarning" not in err


@pytest.fixture
def workflow_config(learnable_dir, tmp_path):
    """EasyCL's plain config, with settings the tiny model learns its tasks with, so matrices say something."""
    path = localised("lora", learnable_dir, tmp_path)
    text = path.read_text()
    for old, new in (
        ("learning_rate: 1.0e-4", "learning_rate: 1.0e-2"),
        ("per_device_train_batch_size: 1", "per_device_train_batch_size: 4"),
        ("gradient_accumulation_steps: 8", "gradient_accumulation_steps: 1"),
        ("num_train_epochs: 3.0", "num_train_epochs: 2"),
        ("lr_scheduler_type: cosine", "lr_scheduler_type: linear"),
        ("warmup_ratio: 0.1", "warmup_ratio: 0.0"),
    ):
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    return path


def test_cl_workflow_modes_give_the_run_matrix(workflow_config, tmp_path, capsys):
    args = ("cl_workflow", "--train_params", workflow_config)
    code, out, err = cli(capsys, *args, "--mode", "train_only")
    assert code == 0, err
    run_dir = tmp_path / "lora_sft"
    assert json.loads((run_dir / "state.json").read_text())["trained"].keys() == {"1", "2"}
    assert not (run_dir / "metrics.json").exists()
    code, out, err = cli(capsys, *args, "--mode", "eval_only")
    assert code == 0, err
    split = json.loads((run_dir / "metrics.json").read_text())

    other = workflow_config.read_text().replace(f"{tmp_path}/lora_sft", f"{tmp_path}/lora_full")
    full_config = tmp_path / "full.yaml"
    full_config.write_text(other)
    code, out, err = cli(capsys, "cl_workflow", "--train_params", full_config, "--mode", "full_workflow")
    assert code == 0, err
    full = json.loads((tmp_path / "lora_full" / "metrics.json").read_text())
    flat = [v for row in full["matrix"] for v in row]
    assert len(full["matrix"]) == 3 and max(flat) > 0
    assert [v for row in split["matrix"] for v in row] == pytest.approx(flat)


def test_cl_workflow_preview_prints_the_plan_and_runs_nothing(workflow_config, tmp_path, capsys):
    code, out, err = cli(
        capsys, "cl_workflow", "--mode", "train_then_eval", "--train_params", workflow_config, "--previewonly"
    )
    assert code == 0, err
    assert "task 1: train task 1 (task0)" in out and "task 2: train task 2 (task1)" in out
    assert "evaluate the base model" in out and "note: 'overwrite_cache'" in out
    assert not (tmp_path / "lora_sft").exists()


def test_cl_workflow_eval_params_and_benchmark_flags(workflow_config, learnable_dir, tmp_path, capsys):
    eval_params = tmp_path / "eval.yaml"
    eval_params.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "tiny-random-llama",
                "cl_tasks": "task0,task1",
                "batch_size": 3,
                "eval_mode": "single",
                "save_dir": str(tmp_path / "eval_results"),
                "calculate_cl_metrics": True,
            }
        )
    )

    def workflow(params, *flags):
        return cli(
            capsys,
            "cl_workflow",
            "--mode",
            "full_workflow",
            "--train_params",
            workflow_config,
            "--eval_params",
            params,
            *flags,
        )

    code, out, err = workflow(eval_params)
    assert code == 0, err
    config = yaml.safe_load((tmp_path / "lora_sft" / "config.yaml").read_text())
    assert config["per_device_eval_batch_size"] == 3  # batch_size is honoured
    copied = json.loads((tmp_path / "eval_results" / "metrics.json").read_text())
    assert copied == json.loads((tmp_path / "lora_sft" / "metrics.json").read_text())
    assert "retain: note: 'eval_mode' (eval_params): not used" in err

    mismatch = tmp_path / "bad_eval.yaml"
    mismatch.write_text(yaml.safe_dump({"model_name_or_path": "other-model", "nonsense_key": 1}))
    code, out, err = workflow(mismatch)
    assert (
        code == 2 and "unknown evaluation keys: 'nonsense_key'" in err and len(err.strip().splitlines()) == 1
    )
    mismatch.write_text(yaml.safe_dump({"model_name_or_path": "other-model"}))
    code, out, err = workflow(mismatch)
    assert code == 2 and "'model_name_or_path': is 'other-model'" in err
    # A save_dir that cannot be written is found before the run, not after it (nor after --clean_dirs).
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    mismatch.write_text(yaml.safe_dump({"save_dir": str(blocker)}))
    code, out, err = workflow(mismatch, "--clean_dirs")
    assert (
        code == 2
        and err.strip()
        == f"retain: error: {mismatch}: 'save_dir': {blocker} is an existing file, not a folder"
    )
    assert (tmp_path / "lora_sft" / "metrics.json").is_file(), "the run was not cleaned away"
    # --clean_dirs checks every folder before it deletes any: a save_dir holding other files stops it.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    mismatch.write_text(yaml.safe_dump({"save_dir": str(mine)}))
    code, out, err = workflow(mismatch, "--clean_dirs")
    assert code == 2 and f"'save_dir': {mine} is not a retain run folder" in err
    assert (mine / "notes.txt").is_file() and (tmp_path / "lora_sft" / "metrics.json").is_file()
    # Nor is a run folder that a running retain process holds deleted.
    mismatch.write_text(yaml.safe_dump({"save_dir": str(tmp_path / "eval_results")}))
    with exclusive_use(tmp_path / "lora_sft", "output_dir"):
        code, out, err = workflow(mismatch, "--clean_dirs")
    assert code == 2 and "lora_sft is in use by another retain process" in err
    assert (tmp_path / "lora_sft" / "metrics.json").is_file()
    # A run folder and its copy are deleted, and the run starts afresh.
    marker = tmp_path / "lora_sft" / "marker"
    marker.write_text("")
    code, out, err = workflow(eval_params, "--clean_dirs")
    assert code == 0, err
    assert not marker.exists() and (tmp_path / "lora_sft" / "metrics.json").is_file()
    again = json.loads((tmp_path / "eval_results" / "metrics.json").read_text())
    assert again == json.loads((tmp_path / "lora_sft" / "metrics.json").read_text())
    assert again["matrix"] == copied["matrix"]  # the same training again (its wall time differs)

    bench = learnable_dir / "benchmark_info.json"
    bench.write_text(json.dumps({"B": {"orders": {"rev": ["task2", "task0"]}}}))
    code, out, err = cli(
        capsys,
        "cl_workflow",
        "--train_params",
        workflow_config,
        "--benchmark",
        "B",
        "--benchmark_order",
        "rev",
        "--benchmark_dir",
        learnable_dir,
        "--previewonly",
    )
    assert code == 0, err
    assert "task 1: train task 1 (task2)" in out and "task 2: train task 2 (task0)" in out
