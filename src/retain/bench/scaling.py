"""`retain bench scaling`: time and memory per task for sequences of 2, 4 and 8 tasks.

Each method runs whole sequences through the engine (`Session.run`) on generated tasks of equal
size and shape (`--rows` train rows, `--test-rows` test rows each), so every task costs the same
to train, and any growth of the per-task training time or memory with the task index or the
sequence length comes from the method's state (buffers, adapters), which should be O(1) per step.
Evaluation is timed separately, per matrix row: with `--eval-scope all` it grows as T^2, with
`seen` (the tasks seen so far plus the next) as about T^2 / 2. The base-row cache is off here, so
row 0 is really evaluated.

Per task: training wall time (`Session.train_task`: the Trainer and the method's task hooks) and
the peak tensor memory allocated above the level before the task, and what the task leaves
allocated (state that accumulates). Per sequence length T: the median over repeats of the mean
training time per task, and its ratio to the shortest sequence's (flat: about 1).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from retain.bench import common
from retain.bench.step_time import method_values
from retain.errors import ConfigError

NAME = "scaling"
HELP = "time and memory per task for sequences of 2, 4 and 8 tasks; evaluation time apart"
DEFAULT_METHODS = "seq,replay,ilora,peft"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common(parser, repeats=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2, 4, 8], help="sequence lengths T")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"default {DEFAULT_METHODS}")
    parser.add_argument("--rows", type=int, default=32, help="train rows per task (default 32)")
    parser.add_argument("--test-rows", type=int, default=8, help="test rows per task (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="train batch size (default 8)")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="eval batch size (default 16)")
    common.add_cutoff(parser)
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--replay-mix-ratio", type=float, default=1.0, help="replay's ratio (default 1.0)")
    parser.add_argument(
        "--eval-scope", choices=("all", "seen"), default="all", help="which entries to evaluate"
    )
    parser.add_argument(
        "--eval", action=argparse.BooleanOptionalAction, default=True, help="evaluate the matrix (default on)"
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure memory per task (on a CPU through the profiler, which adds a little time per op)",
    )


def timed_session(config: Any, device: torch.device, memory: bool) -> Any:
    """A `Session` whose task training and matrix rows are timed (and measured for memory) in `.bench`."""
    from retain.training.sequence import Session

    class TimedSession(Session):
        def load(self) -> None:
            super().load()
            self.model.to(device)  # row 0 runs before any Trainer has moved the model

        def train_task(self, task, data) -> None:
            train = super().train_task
            if memory:
                with common.PeakMemory(device) as peak:
                    seconds, _ = common.timed(lambda: train(task, data), device)
                self.bench["peak_bytes"].append(peak.peak_bytes)
                self.bench["held_bytes"].append(peak.held_bytes)
                self.bench["memory_method"] = peak.method
            else:
                seconds, _ = common.timed(lambda: train(task, data), device)
            self.bench["train_s"].append(seconds)

        def evaluate_row(self, row: int) -> None:
            todo = [c for c in self.columns_for_row(row) if self.state.matrix[row][c] is None]
            seconds, _ = common.timed(lambda: super(TimedSession, self).evaluate_row(row), device)
            self.bench["eval_s"].append(seconds)
            self.bench["eval_entries"].append(len(todo))

    session = TimedSession(config)
    session.bench = {
        "train_s": [],
        "eval_s": [],
        "eval_entries": [],
        "peak_bytes": [],
        "held_bytes": [],
        "memory_method": None,
    }
    return session


def run(args: argparse.Namespace) -> dict[str, Any]:
    from retain.cl.registry import parse_config

    device = common.setup(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    lengths = sorted(set(args.lengths))
    if not methods or not lengths or lengths[0] < 1:
        raise ConfigError("--methods and --lengths (>= 1) must not be empty")
    if args.rows < args.batch_size:
        raise ConfigError("--rows must be at least --batch-size")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {str(t): [] for t in lengths} for m in methods}
    memory_method = None
    with tempfile.TemporaryDirectory(prefix="retain-bench-") as scratch:
        root = Path(scratch)
        names = common.write_generated_tasks(
            root / "data", max(lengths), args.rows, args.test_rows, seed=args.seed
        )
        if args.cutoff_len is None:
            data = {"dataset_dir": str(root / "data"), "cl_tasks": ",".join(names)}
            args.cutoff_len = common.fitting_cutoff({"model_name_or_path": args.model, **data})

        def one_run(method: str, count: int, label: str) -> dict[str, Any]:
            values = {
                "model_name_or_path": args.model,
                "dataset_dir": str(root / "data"),
                "cl_tasks": ",".join(names[:count]),
                **method_values(method, args),
                "cutoff_len": args.cutoff_len,
                "per_device_train_batch_size": args.batch_size,
                "per_device_eval_batch_size": args.eval_batch_size,
                "learning_rate": 1e-4,
                "num_train_epochs": 1,
                "eval_scope": args.eval_scope,
                "eval_base_cache": False,
                "seed": args.seed,
                "disable_tqdm": True,
                "output_dir": str(root / "runs" / label),
                **({"use_cpu": True} if device.type == "cpu" else {}),
            }
            session = timed_session(parse_config(values), device, args.memory)
            with common.quiet():
                session.run(train=True, evaluate=args.eval)
            return session.bench

        counter = 0
        for round_index in range(args.warmup + args.repeats):
            plan = [(m, t) for t in (lengths[:1] if round_index < args.warmup else lengths) for m in methods]
            shift = round_index % len(plan)
            for method, count in plan[shift:] + plan[:shift]:
                counter += 1
                kind = "warm-up" if round_index < args.warmup else "repeat"
                total = args.warmup + args.repeats
                common.progress(f"{NAME}: {method}, T={count} ({kind}, round {round_index + 1}/{total})")
                bench = one_run(method, count, f"{method}_{count}_{counter}")
                if round_index >= args.warmup:
                    runs[method][str(count)].append(bench)
                    memory_method = bench["memory_method"] or memory_method
    body = summarise(runs)
    body["memory_method"] = memory_method
    settings = {
        "methods": methods,
        "lengths": lengths,
        "rows": args.rows,
        "test_rows": args.test_rows,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "cutoff_len": args.cutoff_len,
        "lora_rank": args.lora_rank,
        "replay_mix_ratio": args.replay_mix_ratio,
        "eval_scope": args.eval_scope,
        "eval": args.eval,
        "memory": args.memory,
        "seed": args.seed,
        "data": "generated",
    }
    return common.report(NAME, args, device, settings, body, render)


def _per_index(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Median over repeats of each position of the per-task (or per-row) list `key`."""
    if not runs or not runs[0][key]:
        return []
    return [common.median([r[key][i] for r in runs]) for i in range(len(runs[0][key]))]


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    medians: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, float]] = {}
    for method, by_length in runs.items():
        results[method], medians[method], raw[method] = {}, {}, {}
        for length, samples in by_length.items():
            raw[method][length] = [{k: v for k, v in r.items() if k != "memory_method"} for r in samples]
            train = _per_index(samples, "train_s")
            mean_per_task = common.median([sum(r["train_s"]) / len(r["train_s"]) for r in samples])
            second = train[1] if len(train) > 1 else train[0]
            results[method][length] = {
                "train_s_per_task": train,
                "train_s_mean_per_task": mean_per_task,
                "last_over_second_task": train[-1] / second if second > 0 else None,
                "peak_bytes_per_task": _per_index(samples, "peak_bytes"),
                "held_bytes_per_task": _per_index(samples, "held_bytes"),
                "eval_s_per_row": _per_index(samples, "eval_s"),
                "eval_entries_per_row": samples[0]["eval_entries"],
                "eval_s_total": common.median([sum(r["eval_s"]) for r in samples]),
            }
            medians[method][length] = mean_per_task
        first = medians[method][min(by_length, key=int)]
        ratios[method] = {length: value / first for length, value in medians[method].items()}
    return {"samples": raw, "results": results, "medians": medians, "ratios": ratios}


def render(out: dict[str, Any]) -> str:
    rows = []
    for method, by_length in out["results"].items():
        for length, r in by_length.items():
            entries = sum(r["eval_entries_per_row"])
            peaks, held = r["peak_bytes_per_task"], r["held_bytes_per_task"]
            rows.append(
                [
                    method,
                    int(length),
                    r["train_s_mean_per_task"],
                    out["ratios"][method][length],
                    r["last_over_second_task"],
                    common.mib(max(peaks)) if peaks else None,
                    common.mib(sum(held)) if held else None,
                    r["eval_s_total"],
                    entries,
                    r["eval_s_total"] / entries if entries else None,
                ]
            )
    text = common.table(
        [
            "method",
            "T",
            "train s/task",
            "x shortest",
            "last/2nd task",
            "peak MiB/task",
            "held MiB",
            "eval s",
            "entries",
            "eval s/entry",
        ],
        rows,
    )
    return (
        text
        + "\ntrain s/task: mean over the sequence's tasks (median over repeats); flat means x shortest ~ 1."
        + f"\npeak: max over tasks of the peak allocated during a task; held: allocated by all tasks at the end "
        f"({out['memory_method']})."
    )
