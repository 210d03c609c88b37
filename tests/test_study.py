"""`retain study`: a spec's grid expands into cells that run once, resume, run in lanes, and compare."""

import json
from pathlib import Path

import pytest
import yaml

from retain.cli import main
from retain.errors import ConfigError
from retain.study import load_study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def spec(tmp_path, learnable_dir, tiny_config):
    base = tiny_config(dataset_dir=str(learnable_dir), cl_tasks="task0,task1", learning_rate=1e-2)
    base.pop("output_dir")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "study.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": "base.yaml",
                "config": {"max_samples": 8},
                "output_root": str(tmp_path / "runs"),
                "report_dir": str(tmp_path / "report"),
                "variants": {"seq": {}, "replay": {"cl_method": "replay", "replay_ratio": 0.5}},
                "grid": {"variant": ["seq", "replay"], "seed": [1, 2]},
                "overrides": [{"when": {"variant": "replay", "seed": 2}, "set": {"replay_ratio": 1.0}}],
            },
            sort_keys=False,
        )
    )
    return path


def test_the_grid_expands_into_cells_with_their_overrides(spec, tmp_path):
    values = yaml.safe_load(spec.read_text())
    excluded = tmp_path / "excluded.yaml"
    excluded.write_text(
        yaml.safe_dump({**values, "exclude": [{"variant": "seq", "seed": 2}]}, sort_keys=False)
    )
    assert [c.label for c in load_study(excluded).cells] == ["seq_s1", "replay_s1", "replay_s2"]
    study = load_study(spec)
    assert [c.label for c in study.cells] == ["seq_s1", "seq_s2", "replay_s1", "replay_s2"]
    cell = study.cells[3]
    assert cell.output_dir == tmp_path / "runs" / "replay_s2"
    assert cell.values["cl_method"] == "replay" and cell.values["replay_ratio"] == 1.0  # the override
    assert study.cells[2].values["replay_ratio"] == 0.5 and cell.values["seed"] == 2
    assert cell.values["max_samples"] == 8 and cell.values["learning_rate"] == 1e-2  # config over base
    assert "replay_ratio" not in study.cells[0].values


def test_cells_run_once_resume_and_report(spec, tmp_path, capsys):
    assert main(["study", str(spec), "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 4 and all("to do" in line for line in listing)
    started = tmp_path / "runs" / "seq_s2" / "state.json"  # as a cell killed after its first task leaves it
    started.parent.mkdir(parents=True)
    started.write_text(json.dumps({"tasks": ["task0", "task1"], "trained": {"1": "task_1"}}))
    assert main(["study", str(spec), "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"  1  started 1/2   {started.parent}  (")
    started.unlink()
    for index in range(4):
        assert main(["study", str(spec), "--cell", str(index)]) == 0
    assert main(["study", str(spec), "--cell", "0"]) == 0  # finished: skipped
    assert "done already" in capsys.readouterr().out
    assert main(["study", str(spec), "--list"]) == 0
    assert all(" done " in line for line in capsys.readouterr().out.splitlines())

    assert main(["study", str(spec), "--report"]) == 0
    report = tmp_path / "report"
    table = (report / "comparison.md").read_text()
    assert "| seq |" in table and "| replay |" in table
    summary = json.loads((report / "comparison.json").read_text())
    assert len(summary["seq"]["runs"]) == 2 and len(summary["replay"]["runs"]) == 2
    copied = json.loads((report / "seq_s2" / "metrics.json").read_text())
    assert copied == json.loads((tmp_path / "runs" / "seq_s2" / "metrics.json").read_text())
    # From the copies alone (a clone without the runs), the same tables come back.
    import shutil

    shutil.rmtree(tmp_path / "runs")
    (report / "comparison.md").unlink()
    assert main(["study", str(spec), "--report"]) == 0
    assert (report / "comparison.md").read_text() == table
    # ... and the copied cells count as finished: nothing runs again.
    capsys.readouterr()
    assert main(["study", str(spec), "--list"]) == 0
    assert all(" done " in line for line in capsys.readouterr().out.splitlines())
    assert main(["study", str(spec), "--lanes", "2"]) == 0
    assert "started" not in capsys.readouterr().out and not (tmp_path / "runs").exists()
    (report / "seq_s2" / "metrics.json").unlink()  # deleting a copy runs that cell again
    assert [c.label for c in load_study(spec).cells if not c.finished()] == ["seq_s2"]
    with pytest.raises(ConfigError, match="no cell 9"):
        main(["study", str(spec), "--cell", "9", "--debug"])


def test_a_report_before_any_cell_finished_says_so(spec, capsys):
    assert main(["study", str(spec), "--report"]) == 0
    assert (
        capsys.readouterr().out.strip()
        == "no cell of the study has finished yet (4 cells): nothing to report"
    )


def test_lanes_run_every_unfinished_cell_in_processes(spec, tmp_path, capsys):
    study = load_study(spec)
    first = study.cells[0]
    assert main(["study", str(spec), "--cell", "0"]) == 0
    finished_at = (first.output_dir / "metrics.json").stat().st_mtime_ns
    assert main(["study", str(spec), "--lanes", "2"]) == 0
    assert all(cell.finished() for cell in study.cells)
    assert (first.output_dir / "metrics.json").stat().st_mtime_ns == finished_at  # not run again
    out = capsys.readouterr().out
    assert "cell 0: started" not in out and out.count(": finished") == 3


def test_bad_specs_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": {"variant": ["nope"]}, "variants": {}, "colour": 1}))
    assert main(["study", str(path), "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown study keys: colour" in err[0]
    path.write_text(yaml.safe_dump({"grid": {"variant": ["nope"]}, "variants": {}}))
    assert main(["study", str(path), "--list"]) == 2
    assert "'grid.variant': no variants named nope" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"grid": {"seed": [1]}}))
    assert main(["study", str(path), "--lanes", "0"]) == 2
    assert "--lanes must be at least 1" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"grid": {"seed": [1, 2, 1]}}))  # cells 0 and 2 would resume each other
    assert main(["study", str(path), "--list"]) == 2
    assert "'grid': cells 0 (seed=1) and 2 (seed=1) would share the folder" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"base": "missing.yaml", "grid": {"seed": [1]}}))
    assert main(["study", str(path), "--list"]) == 2
    assert f"'base': config file {tmp_path / 'missing.yaml'} not found" in capsys.readouterr().err
    assert main(["study", str(tmp_path / "none.yaml"), "--list"]) == 2
    assert capsys.readouterr().err.strip() == f"retain: error: {tmp_path / 'none.yaml'}: study spec not found"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "benchmarks" / "studies").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_cell_of_every_shipped_study_is_a_valid_config(path):
    from retain.cl.registry import parse_config

    study = load_study(path)
    assert study.cells
    for cell in study.cells:
        parse_config(cell.values)


@pytest.mark.parametrize("name", ["short1", "short2"])
def test_the_published_studies_are_valid_specs(name):
    study = load_study(ROOT / "benchmarks" / "studies" / f"{name}.yaml")
    from retain.cl.registry import parse_config

    for cell in study.cells:
        config = parse_config(cell.values)
        assert config.data.benchmark_order == name and config.data.benchmark_dir is None
    variants = {cell.point["variant"] for cell in study.cells}
    assert {"seq", "replay", "ilora", "peft_lora", "multitask"} <= variants
    replay = next(c for c in study.cells if c.point["variant"] == "replay")
    assert replay.values["replay_mix_ratio"] == 1.0 and "replay_ratio" not in replay.values
