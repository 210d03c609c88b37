import json
import math

import pytest

from retain.cli import main
from retain.errors import RetainError
from retain.eval.compare import (
    compare,
    comparison_markdown,
    learned_and_forgotten,
    mean_and_sd,
    parse_run_args,
    run_label,
    seen_average_curve,
    tradeoff_figure,
)

TASKS = ["a", "b"]


def write_run(path, matrix, seed, tasks=TASKS, **metrics):
    """A metrics.json with the given matrix and stored metrics (compare computes its own from the matrix)."""
    path.mkdir(parents=True)
    doc = {"tasks": tasks, "matrix": matrix, "method": "seq", "seed": seed, "wall_time_s": 60.0, **metrics}
    (path / "metrics.json").write_text(json.dumps(doc))
    return path


def test_mean_and_sample_sd_by_hand():
    mean, sd = mean_and_sd([0.5, 0.7])
    assert mean == pytest.approx(0.6)
    assert sd == pytest.approx(math.sqrt((0.1**2 + 0.1**2) / 1))
    assert mean_and_sd([0.4]) == (0.4, None)
    assert mean_and_sd([0.4, None]) == (None, None)  # never averaged over the rest


def test_run_label_strips_the_seed_suffix():
    assert run_label("runs/ilora_s1") == "ilora"
    assert run_label("runs/ilora_a09_seed42") == "ilora_a09"
    assert run_label("runs/seq") == "seq"


def test_seen_average_curve_by_hand():
    matrix = [[0.0, 0.0], [0.8, 0.1], [0.4, 0.6]]
    assert seen_average_curve(matrix) == pytest.approx([0.8, 0.5])
    assert seen_average_curve([[0.0, 0.0], [None, 0.1], [0.4, 0.6]]) == [None, pytest.approx(0.5)]


def test_groups_by_seed_suffix_and_averages_matrices(tmp_path):
    one = write_run(tmp_path / "seq_s1", [[0, 0], [0.8, 0.1], [0.4, 0.6]], 1)
    two = write_run(tmp_path / "seq_s2", [[0, 0], [0.6, 0.3], [0.6, 0.8]], 2)
    other = write_run(tmp_path / "x", [[0, 0], [1, 0], [1, None]], 1)
    summary = compare(parse_run_args([str(one), str(two), f"ref={other}"]))
    assert list(summary) == ["seq", "ref"]
    seq = summary["seq"]
    assert seq["seeds"] == [1, 2]
    # Last: (0.4 + 0.6) / 2 and (0.6 + 0.8) / 2; BWT: 0.4 - 0.8 and 0.6 - 0.6; FWT: 0.1 - 0 and 0.3 - 0;
    # LA: (0.8 + 0.6) / 2 and (0.6 + 0.8) / 2.
    assert seq["last"]["mean"] == pytest.approx(0.6)
    assert seq["last"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert seq["bwt"]["mean"] == pytest.approx(-0.2)
    assert seq["fwt"]["mean"] == pytest.approx(0.2)
    assert seq["learning_accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["ref"]["learning_accuracy"] == {"mean": None, "sd": None}  # a missing entry, never 0
    assert seq["matrix"][2] == pytest.approx([0.5, 0.7])
    assert seq["seen_average"] == pytest.approx([0.7, 0.6])
    assert summary["ref"]["bwt"] == {"mean": 0.0, "sd": None}
    assert [r["seed"] for r in seq["per_run"]] == [1, 2]
    per_run = [(r["last"], r["bwt"]) for r in seq["per_run"]]
    assert per_run == [pytest.approx((0.5, -0.4)), pytest.approx((0.7, 0))]


def test_metrics_come_from_the_matrix_not_the_stored_values(tmp_path, capsys):
    """A file that an earlier version wrote (no LA) or whose stored figures disagree with its matrix."""
    run = write_run(tmp_path / "seq_s1", [[0, 0], [0.8, 0.1], [0.4, 0.6]], 1, last=0.9, avg=0.1)
    entry = compare(parse_run_args([str(run)]))["seq"]
    assert entry["last"]["mean"] == pytest.approx(0.5)
    assert entry["avg"]["mean"] == pytest.approx((0.8 + 0.5) / 2)
    assert entry["learning_accuracy"]["mean"] == pytest.approx(0.7)
    assert main(["report", str(run)]) == 0
    assert "last=50.0  avg=65.0  learning_accuracy=70.0  bwt=-40.0" in capsys.readouterr().out


def test_learned_and_forgotten_points(tmp_path):
    """The trade-off figure's points: LA and Forgetting in %, a group with either missing left out."""
    one = write_run(tmp_path / "seq_s1", [[0, 0], [0.8, 0.1], [0.4, 0.6]], 1)
    two = write_run(tmp_path / "seq_s2", [[0, 0], [0.6, 0.3], [0.6, 0.8]], 2)
    gap = write_run(tmp_path / "gap", [[0, 0], [0.6, 0.3], [None, 0.8]], 1)
    points = learned_and_forgotten(compare(parse_run_args([str(one), str(two), str(gap)])))
    # LA (0.8 + 0.6) / 2 and (0.6 + 0.8) / 2; Forgetting 0.8 - 0.4 and 0.6 - 0.6.
    assert points == [("seq", pytest.approx(70.0), pytest.approx(20.0))]


def test_tradeoff_labels_do_not_overlap_when_points_crowd():
    """Ten groups within a fraction of a point of each other: every label is still readable on its own."""
    from matplotlib.text import Text

    from retain.eval.report import pyplot

    summary = {
        f"method_{i}": {
            "learning_accuracy": {"mean": 0.50 + 0.001 * i},
            "forgetting": {"mean": 0.10 + 0.001 * (i % 3)},
        }
        for i in range(10)
    }
    summary["far"] = {"learning_accuracy": {"mean": 0.9}, "forgetting": {"mean": 0.4}}
    fig = tradeoff_figure(summary)
    fig.canvas.draw()
    ax = fig.axes[0]
    boxes = [Text.get_window_extent(text) for text in ax.texts]  # the text alone, not its line
    assert sorted(text.get_text() for text in ax.texts) == sorted(summary)
    axes_box = ax.get_window_extent()
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1 :]), ax.texts[i].get_text()
        assert axes_box.contains(box.x0, box.y0) and axes_box.contains(box.x1, box.y1)
    pyplot().close(fig)


def test_mixed_task_sequences_in_a_group_are_an_error(tmp_path):
    one = write_run(tmp_path / "m_s1", [[0, 0], [1, 0], [1, 1]], 1)
    two = write_run(tmp_path / "m_s2", [[0, 0], [1, 0], [1, 1]], 2, tasks=["a", "c"])
    with pytest.raises(RetainError, match="mixes task sequences"):
        compare(parse_run_args([str(one), str(two)]))


def test_compare_command_writes_its_files(tmp_path, capsys):
    one = write_run(tmp_path / "seq_s1", [[0, 0], [0.8, 0.1], [0.4, 0.6]], 1)
    two = write_run(tmp_path / "seq_s2", [[0, 0], [0.6, 0.3], [0.6, 0.8]], 2)
    out = tmp_path / "cmp"
    assert main(["compare", str(one), str(two), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| seq | seq | 1, 2 | 60.0 ± 14.1 |" in printed
    # One row per run; Avg (0.6 + 0.7) / 2, LA (0.6 + 0.8) / 2, FWT 0.3 - 0, Forgetting 0.6 - 0.6.
    assert f"| {two} | 2 | 70.0 | 65.0 | 70.0 | 0.0 | 30.0 | 0.0 | 1 |" in printed
    assert json.loads((out / "comparison.json").read_text())["seq"]["last"]["mean"] == pytest.approx(0.6)
    for name in ("comparison.png", "heatmaps.png", "task_curves.png", "tradeoff.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert main(["compare", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"tasks": ["a"]}, "not a metrics file written by retain: no 'matrix' list"),
        ({"matrix": [[0.5]]}, "not a metrics file written by retain: no 'tasks' list"),
        ([1, 2], "not a metrics file written by retain: expected a JSON object"),
        (b"\xff\xfe{", "not a UTF-8 text file"),
        ({"tasks": [], "matrix": [[]]}, "not a metrics file written by retain: 'tasks' must be task names"),
        (
            {"tasks": ["a", 2], "matrix": []},
            "not a metrics file written by retain: 'tasks' must be task names",
        ),
        (
            {"tasks": ["a", "b"], "matrix": [[0.5, 0.1], [0.2]]},
            "'matrix' must be 3 rows (the base model, then",
        ),
        ({"tasks": ["a"], "matrix": [[0.5], [0.5], [0.5]]}, "'matrix' must be 2 rows (the base model, then"),
        (
            {"tasks": ["a"], "matrix": [[0.5], ["0.9"]]},
            "'matrix' must be 2 rows (the base model, then one after",
        ),
        ({"tasks": ["a"], "matrix": [[0.5], [True]]}, "of 1 scores in [0, 1] or nulls"),
        ({"tasks": ["a"], "matrix": [[0.5], [float("nan")]]}, "of 1 scores in [0, 1] or nulls"),
        ({"tasks": ["a"], "matrix": [[0.5], [1.5]]}, "of 1 scores in [0, 1] or nulls"),
        (
            {"tasks": ["a"], "matrix": [[0.5], [0.5]], "extra_matrices": {"off_label": [[0.5], [-0.1]]}},
            "'extra_matrices.off_label' must be 2 rows",
        ),
        (
            {"tasks": ["a"], "matrix": [[0.5], [None]], "extra_matrices": []},
            "'extra_matrices' must be an object",
        ),
        (
            {"tasks": ["a"], "matrix": [[0.5], [None]], "extra_matrices": {"choice_accuracy": [[0.5]]}},
            "'extra_matrices.choice_accuracy' must be 2 rows",
        ),
    ],
)
@pytest.mark.parametrize("command", ["compare", "report"])
def test_a_json_file_that_is_not_a_run_s_metrics_is_one_line(tmp_path, capsys, document, message, command):
    run = tmp_path / "other"
    run.mkdir()
    (run / "metrics.json").write_bytes(
        document if isinstance(document, bytes) else json.dumps(document).encode()
    )
    assert main([command, str(run)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"retain: error: {run / 'metrics.json'}: ") and message in err
    assert sorted(path.name for path in run.iterdir()) == ["metrics.json"], "nothing is written"


def test_a_tiny_negative_mean_prints_as_zero(tmp_path):
    # BWT: 0.3 - 0.30000000000000004, a tiny negative number
    run = write_run(tmp_path / "m_s1", [[0, 0], [0.1 + 0.2, 0], [0.3, 1]], 1)
    summary = compare(parse_run_args([str(run)]))
    assert -1e-15 < summary["m"]["bwt"]["mean"] < 0
    text = comparison_markdown(summary)
    assert "-0.0" not in text and "| m | seq | 1 | 65.0 | 47.5 | 65.0 | 0.0 |" in text


def test_extra_matrices_are_summarised_when_every_run_has_them(tmp_path):
    """eval_mode both: choice accuracy and mode agreement get Last/Avg/BWT by the main matrix's definitions."""
    main_matrix = [[0, 0], [1, 0], [1, 1]]
    one = write_run(tmp_path / "seq_s1", main_matrix, 1)
    two = write_run(tmp_path / "seq_s2", main_matrix, 2)
    for run, choice, only_here in (
        (one, [[0.5, 0.5], [0.9, 0.2], [0.7, 0.8]], {"mode_agreement": [[1, 1], [1, 1], [1, 1]]}),
        (two, [[0.5, 0.5], [0.8, 0.4], [0.8, 0.6]], {}),
    ):
        doc = json.loads((run / "metrics.json").read_text())
        doc["extra_matrices"] = {"choice_accuracy": choice, **only_here}
        (run / "metrics.json").write_text(json.dumps(doc))
    summary = compare(parse_run_args([str(one), str(two)]))
    extra = summary["seq"]["extra"]
    assert list(extra) == ["choice_accuracy"]  # mode_agreement: one run lacks it, so it is left out
    # Last: (0.7 + 0.8) / 2 = 0.75 and (0.8 + 0.6) / 2 = 0.7; Avg: (0.9 + 0.75) / 2 and (0.8 + 0.7) / 2;
    # BWT: 0.7 - 0.9 and 0.8 - 0.8.
    assert extra["choice_accuracy"]["last"]["mean"] == pytest.approx(0.725)
    assert extra["choice_accuracy"]["last"]["sd"] == pytest.approx(math.sqrt(2 * 0.025**2))
    assert extra["choice_accuracy"]["avg"]["mean"] == pytest.approx((0.825 + 0.75) / 2)
    assert extra["choice_accuracy"]["bwt"]["mean"] == pytest.approx(-0.1)
    text = comparison_markdown(summary)
    assert "`choice_accuracy` (an extra matrix" in text and "`mode_agreement`" not in text
    assert "| seq | 72.5 ± 3.5 | 78.8 ± 5.3 | 77.5 ± 10.6 | -10.0 ± 14.1 |" in text  # LA: 0.85 and 0.7


def test_a_run_given_twice_or_an_empty_label_is_an_error(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "seq_s1", [[0, 0], [1, 0], [1, 1]], 1)
    monkeypatch.chdir(tmp_path)
    for args, message in [
        (["seq_s1", "./seq_s1"], "the run ./seq_s1 is given twice (first as 'seq_s1')"),
        (["a=seq_s1", f"b={run}"], f"the run {run} is given twice (first as 'a=seq_s1')"),
        (["=seq_s1"], "'=seq_s1': the label before '=' is empty"),
    ]:
        assert main(["compare", *args]) == 2
        assert capsys.readouterr().err.strip() == f"retain: error: 'RUN_DIR': {message}"
    (tmp_path / "taken").write_text("mine")
    assert main(["compare", "seq_s1", "--out", "taken"]) == 2
    assert "'--out': taken is an existing file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "mine"


def test_two_runs_of_one_seed_in_a_group_get_a_note(tmp_path, caplog):
    one = write_run(tmp_path / "a" / "seq_s1", [[0, 0], [1, 0], [1, 1]], 1)
    copy = write_run(tmp_path / "b" / "seq_s1", [[0, 0], [1, 0], [1, 1]], 1)
    other = write_run(tmp_path / "seq_s2", [[0, 0], [1, 0], [1, 1]], 2)
    with caplog.at_level("WARNING", logger="retain.eval.compare"):
        summary = compare(parse_run_args([str(one), str(copy), str(other)]))
    assert summary["seq"]["seeds"] == [1, 1, 2]
    assert "group 'seq' has seed 1 in more than one run" in caplog.text
    caplog.clear()
    compare(parse_run_args([str(one), str(other)]))
    assert "more than one run" not in caplog.text
