"""`retain bench`: every sub-benchmark runs on the tiny model and writes consistent JSON.

These tests check structure and arithmetic (ratios are medians over the reference's median, medians
are medians of the raw samples), never timings.
"""

import json
import statistics

import pytest

from retain.bench.step_time import EMA_PASS, JOINED, REPLAY
from retain.cli import main

COMMON = ["--model", "tiny-random-llama", "--threads", "1"]
TOP_KEYS = {"benchmark", "version", "model", "device", "torch_threads", "machine", "settings"}
TOP_KEYS |= {"arguments", "samples", "medians", "ratios", "repeats", "warmup"}


def bench(tmp_path, capsys, name, *options):
    path = tmp_path / f"{name}.json"
    assert main(["bench", name, *COMMON, *options, "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert TOP_KEYS <= set(out)
    assert out["benchmark"] == name
    assert out["model"] == "tiny-random-llama" and out["torch_threads"] == 1
    assert {"platform", "torch", "cpu_count", "device"} <= set(out["machine"])
    assert out["arguments"]["json_path"] == str(path)
    printed = capsys.readouterr().out
    assert printed.startswith(f"retain bench {name}: model tiny-random-llama")
    return out, printed


def test_step_time(tmp_path, capsys):
    out, printed = bench(
        tmp_path,
        capsys,
        "step-time",
        *("--data", "demo", "--repeats", "2", "--warmup", "0", "--batch-size", "2", "--rows", "6"),
        *("--prep-steps", "1", "--memory-repeats", "1", "--methods", "seq,replay,ilora,ilora_joined,peft"),
    )
    methods = ["seq", "replay", "ilora", "ilora_joined", "peft"]
    assert out["methods"] == methods
    times, peaks = out["samples"]["step_s"], out["samples"]["peak_bytes"]
    assert set(times) == {*methods, JOINED, REPLAY, EMA_PASS}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in times.values())
    medians = out["medians"]["step_s"]
    for name, values in times.items():
        assert medians[name] == pytest.approx(statistics.median(values))
    for name in methods:
        assert out["ratios"]["step_s"][name] == pytest.approx(medians[name] / medians["seq"])
        assert len(peaks[name]) == 1 and peaks[name][0] > 0
        assert out["ratios"]["peak_bytes"][name] == pytest.approx(peaks[name][0] / peaks["seq"][0])
        assert f"| {name} " in printed
    assert out["ratios"]["step_s"]["seq"] == 1.0
    assert out["memory_method"] == "profiler"
    # Equal batch; I-LoRA replays a batch as large again, replay mixes its memory into the batch.
    rows = out["rows_per_step"]
    assert rows["seq"] == {"rows": 2, "current": 2, "replayed": 0}
    assert rows["ilora"] == rows["ilora_joined"] == {"rows": 4, "current": 2, "replayed": 2}
    assert rows["replay"]["rows"] == 2 and 0 < rows["replay"]["replayed"] < 2
    ratio = out["ratios"]["step_s"]["replay"]
    assert out["ratios"]["per_current_row"]["replay"] == pytest.approx(ratio * 2 / rows["replay"]["current"])
    floors = out["floors"]
    assert floors["seq"]["flop_ratio"] == 1.0 and floors["seq"]["textbook_ratio"] == 1.0
    # Counted, not timed: fixed by the batch shapes. The joined pass pads both batches to one width.
    assert 2.0 < floors["ilora"]["flop_ratio"] <= floors["ilora_joined"]["flop_ratio"] < 3.5
    assert floors["ilora"]["measured_ratio"] == pytest.approx(
        (medians["seq"] + medians[REPLAY] + medians[EMA_PASS]) / medians["seq"]
    )
    assert floors["ilora_joined"]["measured_ratio"] == pytest.approx(
        (medians[JOINED] + medians[EMA_PASS]) / medians["seq"]
    )
    # No --cutoff-len: the cutoff is the longest loaded row, so no answer is cut.
    from retain.data.prompt import PromptBuilder
    from retain.data.tasks import load_tasks
    from retain.hparams.args import DataArguments
    from retain.model.tiny import build_tiny_tokenizer

    builder = PromptBuilder(build_tiny_tokenizer())
    data = DataArguments(
        dataset_dir="builtin://demo", cl_tasks=["paint_colour", "flag_colour"], max_samples=6
    )
    rows = [e for task in load_tasks(data) for e in task.train]
    assert out["settings"]["cutoff_len"] == max(
        len(builder.prompt_ids(e)) + len(builder.answer_ids(e.answer)) for e in rows
    )


def test_eval(tmp_path, capsys):
    out, printed = bench(
        tmp_path,
        capsys,
        "eval",
        *("--data", "demo", "--rows", "5", "--batch-size", "2", "--repeats", "2", "--warmup", "0"),
    )
    variants = ["naive", "batched", "ours", "floor", "cached"]
    assert out["settings"]["variants"] == variants
    task = out["tasks"]["paint_colour"]
    assert task["examples"] == 5 == out["examples"]
    for v in variants:
        assert len(task["samples_s"][v]) == 2
        assert out["samples"][f"paint_colour:{v}"] == task["samples_s"][v]
        assert task["medians_s"][v] == pytest.approx(statistics.median(task["samples_s"][v]))
        assert task["ratios_to_floor"][v] == pytest.approx(task["medians_s"][v] / task["medians_s"]["floor"])
        assert out["examples_per_s"][v] == pytest.approx(5 / out["medians"][v])
        assert out["ratios"][v] == pytest.approx(out["medians"][v] / out["medians"]["floor"])
    # The prefix cache changes no prediction, and the cached base-row entry holds ours.
    assert task["identical_predictions"] and out["identical_predictions"]
    assert task["mismatches"]["ours_vs_batched"] == 0
    assert task["cached_entry_matches"]
    assert task["accuracy"]["ours"] == task["accuracy"]["batched"]
    assert task["shared_prefix_tokens"] > 0
    matrix = out["matrix_estimate"]
    assert matrix["batched_s"] == pytest.approx(2 * out["medians"]["batched"])
    assert matrix["ours_with_cached_base_row_s"] == pytest.approx(
        out["medians"]["ours"] + out["medians"]["cached"]
    )
    assert "| floor " in printed


def test_eval_choice_on_a_task_with_labels(tmp_path, capsys):
    out, printed = bench(
        tmp_path,
        capsys,
        "eval",
        *("--tasks", "COPA", "--rows", "3", "--batch-size", "3", "--repeats", "1", "--warmup", "0"),
        "--skip-naive",
    )
    assert out["settings"]["variants"] == ["batched", "ours", "floor", "cached", "choice"]
    task = out["tasks"]["COPA"]
    assert len(task["samples_s"]["choice"]) == 1 and out["ratios"]["choice"] > 0
    assert 0 <= task["mismatches"]["choice_vs_ours_labels"] <= 3
    assert task["accuracy"]["choice"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "| choice " in printed


def test_scaling(tmp_path, capsys):
    out, printed = bench(
        tmp_path,
        capsys,
        "scaling",
        *("--lengths", "1", "2", "--methods", "seq,ilora", "--rows", "4", "--test-rows", "2"),
        *("--batch-size", "2", "--repeats", "1", "--warmup", "0"),
    )
    assert out["settings"]["lengths"] == [1, 2]
    # No --cutoff-len: the longest generated row, which the tiny tokenizer makes longer than 128 tokens.
    assert out["settings"]["cutoff_len"] > 128
    for method in ("seq", "ilora"):
        assert out["ratios"][method]["1"] == 1.0
        for length in (1, 2):
            r = out["results"][method][str(length)]
            runs = out["samples"][method][str(length)]
            assert len(runs) == 1  # one repeat
            assert len(runs[0]["train_s"]) == length and len(runs[0]["eval_s"]) == length + 1
            assert len(r["train_s_per_task"]) == length
            assert len(r["eval_s_per_row"]) == length + 1
            assert r["eval_entries_per_row"] == [length] * (length + 1)  # eval_scope all
            assert len(r["peak_bytes_per_task"]) == length and min(r["peak_bytes_per_task"]) > 0
            mean = sum(runs[0]["train_s"]) / length
            assert out["medians"][method][str(length)] == pytest.approx(mean)
            ratio = out["medians"][method][str(length)] / out["medians"][method]["1"]
            assert out["ratios"][method][str(length)] == pytest.approx(ratio)
    assert "| ilora " in printed


def test_cil(tmp_path, capsys):
    out, printed = bench(
        tmp_path,
        capsys,
        "cil",
        *("--tasks", "1", "2", "--rows", "3", "--train-rows", "4", "--train-batch-size", "2"),
        *("--batch-size", "4", "--epochs", "1", "--repeats", "2", "--warmup", "0", "--cutoff-len", "256"),
    )
    assert set(out["results"]) == {"1", "2"}
    for length in ("1", "2"):
        r = out["results"][length]
        assert r["examples"] == 3 * int(length)
        assert {k: len(v) for k, v in r["samples_s"].items()} == {"all": 2, "hard": 2, "soft": 2}
        assert out["samples"][length] == r["samples_s"]
        medians = {k: statistics.median(v) for k, v in r["samples_s"].items()}
        assert r["medians_s"] == pytest.approx(medians)
        assert out["ratios"][length] == pytest.approx(medians["all"] / medians["hard"])
        assert r["ratio_soft_over_hard"] == pytest.approx(medians["soft"] / medians["hard"])
        assert 0.0 <= r["router_accuracy"] <= 1.0
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    assert out["results"]["1"]["router_accuracy"] == 1.0  # one task: every row is routed to it
    one = out["results"]["1"]["accuracy"]  # one task: the three routings answer alike
    assert one["all"] == one["hard"] == one["soft"]
    assert "all / hard" in printed


def test_write(tmp_path, capsys):
    out, printed = bench(
        tmp_path,
        capsys,
        "write",
        *("--data", "demo", "--rows", "3", "--batch-size", "2", "--num-shots", "1"),
        *("--repeats", "2", "--warmup", "0"),
    )
    task = out["tasks"]["paint_colour"]
    assert task["prompt_tokens"] > 0 and task["max_new_tokens"] > 0
    for v in ("static", "dynamic"):
        assert out["samples"][f"paint_colour:{v}"] == task["samples_s"][v] and len(task["samples_s"][v]) == 2
        assert task["medians_s"][v] == pytest.approx(statistics.median(task["samples_s"][v]))
    assert out["ratios"]["static"] == pytest.approx(out["medians"]["static"] / out["medians"]["dynamic"])
    # The preallocated cache samples the same rows as the growing one, from the same seeds.
    assert task["different_rows"] == 0 == out["different_rows"]
    assert "| paint_colour " in printed


def test_an_unknown_method_is_one_line_before_any_model_loads(capsys):
    assert main(["bench", "step-time", *COMMON, "--methods", "seq,ewc,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--methods: unknown method 'nope'; available: agem, ewc" in err[0], err


@pytest.mark.parametrize("name", ["step-time", "eval", "scaling", "cil", "write"])
def test_bad_shared_options_are_one_line_before_any_work(name, tmp_path, capsys, monkeypatch):
    """A --json that cannot be written would otherwise end a finished benchmark in a traceback."""
    import retain.model.loader

    def no_model(*args, **kwargs):
        raise AssertionError("no model may load before the options are checked")

    monkeypatch.setattr(retain.model.loader, "load_model", no_model)
    blocker = tmp_path / "file"
    blocker.write_text("")
    for options, message in (
        (["--json", str(blocker / "out.json")], f"'--json': {blocker} is an existing file, not a folder"),
        (["--json", str(tmp_path)], f"'--json': {tmp_path} is a folder, not a file"),
        (["--threads", "0"], "--threads must be at least 1"),
    ):
        assert main(["bench", name, "--model", "tiny-random-llama", *options]) == 2
        (err,) = capsys.readouterr().err.strip().splitlines()
        assert err == f"retain: error: {message}"
    assert main(["bench", "step-time", *COMMON, "--rows", "0"]) == 2
    assert "--rows must be at least 1" in capsys.readouterr().err
