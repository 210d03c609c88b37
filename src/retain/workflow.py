"""`retain cl_workflow`: EasyCL's command line, so that `easycl-cli cl_workflow ...` becomes `retain cl_workflow ...`.

EasyCL runs one training command per task and then evaluation commands; `retain` runs the whole
sequence in one process with the same config (`--train_params`), so the modes map onto one run:

| EasyCL mode | retain |
|---|---|
| `train_only` | train every task (`retain train`) |
| `eval_only` | evaluate the saved task states of the run in `output_dir` (`retain eval`) |
| `train_then_eval`, `full_workflow` | train, and evaluate every task after each one (`retain run`): the full matrix |

`--eval_params` (EasyCL's evaluation YAML) is read through `EVAL_KEYS`: a key that maps to a retain
key is applied, one that must agree with the training config is checked, one that does not apply
gets a note, and any other is an error.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

from retain.cl.registry import parse_config
from retain.errors import ConfigError
from retain.eval.report import write_results
from retain.hparams.parser import RunConfig, read_yaml
from retain.io import exclusive_use, make_writable_dir

logger = logging.getLogger(__name__)

MODES = ("train_only", "eval_only", "train_then_eval", "full_workflow")

#: EasyCL evaluation keys: ("set", retain key) applies the value, ("same", retain key) must equal the
#: training config's value, ("note", text) is accepted and not used.
EVAL_KEYS: dict[str, tuple[str, str]] = {
    "batch_size": ("set", "per_device_eval_batch_size"),
    "model_name_or_path": ("same", "model_name_or_path"),
    "cl_tasks": ("same", "cl_tasks"),
    "template": ("same", "template"),
    "dataset_dir": ("same", "dataset_dir"),
    "cutoff_len": ("same", "cutoff_len"),
    "save_dir": ("note", "the results are written to output_dir and copied to save_dir"),
    "eval_mode": ("note", "not used: each task's saved state is evaluated the way its method defines"),
    "cl_tuning_type": ("note", "not used: the method's own adapters are evaluated"),
    "multi_adapter_dir": ("note", "not used: the method's own adapters are evaluated"),
    "adapter_name_or_path": ("note", "not used: eval_only evaluates the task states saved in output_dir"),
    "calculate_cl_metrics": ("note", "not used: Last, Avg, BWT, FWT and forgetting are always computed"),
    "cleval_use_vllm": ("note", "not used: retain generates with transformers"),
    "vllm_pipeline_parallel_size": ("note", "not used: retain generates with transformers"),
    "use_moelora_eval": ("note", "not used: retain has no MoE-LoRA method"),
    "use_clmoe_eval": ("note", "not used: retain has no CL-MoE method"),
    "use_abscl_selector": ("note", "not used: retain has no ABSCL method"),
    "abscl_selector_batch_size": ("note", "not used: retain has no ABSCL method"),
    "use_dynamic_conpet_selector": ("note", "not used: retain has no Dynamic ConPet method"),
    "dynamic_conpet_selector_batch_size": ("note", "not used: retain has no Dynamic ConPet method"),
    "compared_adapter_name_or_path": ("note", "not used"),
    "compared_model_name_or_path": ("note", "not used"),
    "dataset_options": ("note", "not used: task options come from dataset_info.json"),
    "n_shot": ("note", "not used: evaluation is zero-shot on each task's test split"),
    "lang": ("note", "not used"),
    "task": ("note", "not used: the tasks are the training config's"),
    "task_dir": ("note", "not used: the tasks are the training config's"),
    "download_mode": ("note", "not used: nothing is downloaded"),
    "seed": ("note", "not used: the training config's seed is the run's"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode", choices=MODES, default="train_only", help="what to run (default train_only)"
    )
    parser.add_argument("--train_params", required=True, help="EasyCL/LLaMA-Factory training YAML")
    parser.add_argument("--eval_params", help="EasyCL evaluation YAML (optional)")
    parser.add_argument(
        "--benchmark", help="benchmark name in benchmark_info.json (replaces the config's tasks)"
    )
    parser.add_argument("--benchmark_order", help="task order of the benchmark")
    parser.add_argument("--benchmark_dir", help="folder with benchmark_info.json and dataset_info.json")
    parser.add_argument("--previewonly", action="store_true", help="print the plan and stop")
    parser.add_argument(
        "--clean_dirs", action="store_true", help="delete the run's earlier output_dir (and save_dir) first"
    )


def workflow_values(args: argparse.Namespace) -> tuple[dict[str, Any], str | None, list[str]]:
    """The run's flat config values, the eval `save_dir` and the notes about the eval keys."""
    source = args.train_params
    values = read_yaml(source)
    if args.benchmark or args.benchmark_order or args.benchmark_dir:
        if not (args.benchmark and args.benchmark_order):
            raise ConfigError("--benchmark and --benchmark_order go together", source="command line")
        for key in ("dataset", "cl_tasks"):
            values.pop(key, None)
        values.update(benchmark=args.benchmark, benchmark_order=args.benchmark_order)
        if args.benchmark_dir:
            values["benchmark_dir"] = args.benchmark_dir
    save_dir, notes = None, []
    if args.eval_params:
        save_dir, notes = _apply_eval_params(
            values, read_yaml(args.eval_params), args.eval_params, args.benchmark
        )
    return values, save_dir, notes


def _apply_eval_params(
    values: dict[str, Any], eval_values: dict[str, Any], source: str, benchmark: str | None
) -> tuple[str | None, list[str]]:
    unknown = sorted(key for key in eval_values if key not in EVAL_KEYS)
    if unknown:
        listed = ", ".join(f"'{key}'" for key in unknown)
        raise ConfigError(
            f"unknown evaluation keys: {listed} (known: {', '.join(sorted(EVAL_KEYS))})", source=source
        )
    notes = []
    for key, value in eval_values.items():
        action, target = EVAL_KEYS[key]
        if action == "set":
            values[target] = value
        elif action == "same":
            trained = (
                values.get("dataset", values.get(target)) if target == "cl_tasks" else values.get(target)
            )
            if (
                benchmark is None
                and value is not None
                and trained is not None
                and _listed(value) != _listed(trained)
            ):
                raise ConfigError(
                    f"is {value!r} but the training config has {trained!r}: retain evaluates the run it trains",
                    source=source,
                    field=key,
                )
        elif key != "save_dir" and value not in (None, False, ""):
            notes.append(f"'{key}' (eval_params): {target}")
    save_dir = eval_values.get("save_dir")
    return (str(save_dir) if save_dir else None), notes


def _listed(value: Any) -> Any:
    if isinstance(value, str) and "," in value:
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def plan(config: RunConfig, mode: str, tasks: list[str], save_dir: str | None) -> str:
    out = config.output_dir
    train = mode != "eval_only"
    evaluate = mode != "train_only"
    lines = [
        f"cl_workflow --mode {mode}: method {config.cl.cl_method}, model {config.model.model_name_or_path}, "
        f"{len(tasks)} tasks, output_dir {out}"
    ]
    if evaluate and config.cl.eval_base:
        lines.append("  evaluate the base model on every task (row 0)")
    for number, name in enumerate(tasks, start=1):
        steps = []
        if train:
            steps.append(f"train task {number} ({name}), save its state in {out}")
        if evaluate:
            steps.append(
                f"evaluate on {'every task' if config.cl.eval_scope == 'all' else 'the tasks seen so far'}"
            )
        lines.append(f"  task {number}: " + "; ".join(steps))
    if evaluate:
        lines.append(
            f"  write metrics.json, report.md and the plots to {out}"
            + (f" and {save_dir}" if save_dir else "")
        )
    return "\n".join(lines)


def _clean(folders: dict[str, Path]) -> None:
    """--clean_dirs: delete earlier run folders ({field: folder}); every one is checked before any is deleted.

    Every process checks (the same verdict everywhere, so none is left waiting for one that stopped); the
    main process deletes, between barriers, so no process sees a folder half deleted or starts early, and
    never a folder that a running retain process holds (`exclusive_use`).
    """
    from accelerate import PartialState

    for field, path in folders.items():
        is_run = (path / "state.json").is_file() or (path / "metrics.json").is_file()
        if path.exists() and not is_run and not (path.is_dir() and not any(path.iterdir())):
            raise ConfigError(
                f"{path} is not a retain run folder; --clean_dirs deletes run folders only", field=field
            )
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        for field, path in folders.items():
            if path.is_dir():
                with exclusive_use(path, field):
                    shutil.rmtree(path)
    state.wait_for_everyone()


def run(args: argparse.Namespace) -> tuple[dict[str, Any] | None, Path]:
    """Run the workflow; returns the metrics (None without evaluation or with --previewonly) and the run folder."""
    from retain.data.tasks import task_sequence
    from retain.training.sequence import Session

    values, save_dir, notes = workflow_values(args)
    config = parse_config(values, source=args.train_params)
    config.notes.extend(notes)
    _, tasks = task_sequence(config.data)
    if args.previewonly:
        print(plan(config, args.mode, tasks, save_dir))
        for note in config.notes:
            print(f"note: {note}")
        return None, config.output_dir
    if save_dir:  # before anything is deleted or trained: the copy is written at the very end
        make_writable_dir(Path(save_dir), "save_dir", ConfigError, source=str(args.eval_params))
    if args.clean_dirs:
        _clean({"output_dir": config.output_dir, **({"save_dir": Path(save_dir)} if save_dir else {})})
    session = Session(config)
    result = session.run(train=args.mode != "eval_only", evaluate=args.mode != "train_only")
    if result is not None and save_dir and session.state_.is_main_process:
        write_results(save_dir, result)
    session.close()
    return result, session.run_dir
