"""The `retain` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from retain.errors import RetainError


def _format_matrix(metrics: dict[str, Any]) -> str:
    from retain.eval.report import SUMMARY_KEYS, row_labels

    tasks = metrics["tasks"]
    labels = row_labels(tasks)
    width = max(len(x) for x in labels)
    cols = [max(6, len(t)) for t in tasks]
    lines = [" " * width + "  " + "  ".join(t.rjust(c) for t, c in zip(tasks, cols, strict=True))]
    for label, row in zip(labels, metrics["matrix"], strict=True):
        cells = ["n/a" if v is None else f"{100 * v:.1f}" for v in row]
        lines.append(
            label.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, cols, strict=True))
        )
    values = []
    for key in SUMMARY_KEYS:
        v = metrics.get(key)
        values.append(f"{key}={'n/a' if v is None else f'{100 * v:.1f}'}")
    mode = metrics.get("eval_mode", "generate")
    return "\n".join(lines) + "\n" + "  ".join(values) + f"  (accuracy %, eval_mode {mode})"


def _print_result(metrics: dict[str, Any], output_dir: Path) -> None:
    print("accuracy matrix (%): row = after training task, column = evaluated task")
    print(_format_matrix(metrics))
    print(f"report: {output_dir / 'report.md'}")


def cmd_run(args: argparse.Namespace, mode: str) -> int:
    from retain.cl.registry import load_config
    from retain.training.sequence import Session

    config = load_config(args.config, args.overrides)
    session = Session(config, force=args.force)
    if session.is_finished() and mode != "train":
        print(f"nothing to do: the run in {session.run_dir} is finished")
        from retain.eval.report import load_metrics

        _print_result(load_metrics(session.run_dir), session.run_dir)
        session.close()
        return 0
    result = session.run(train=mode != "eval", evaluate=mode != "train")
    if session.state_.is_main_process:
        if result is None:
            print(f"trained {len(session.state.trained)} task(s); states in {session.output_dir}")
        else:
            _print_result(result, session.run_dir)
    session.close()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from retain.api import report

    metrics = report(args.run_dir)
    _print_result(metrics, Path(args.run_dir))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from retain.model.aliases import ALIASES, alias_dir, is_prepared, prepare_alias

    if args.prepare:
        for name in args.prepare:
            if name not in ALIASES:
                raise RetainError(f"unknown alias '{name}' (known: {', '.join(ALIASES)})")
            print(f"{name}: {prepare_alias(name, args.cache_dir)}")
        return 0
    for alias in ALIASES.values():
        if not alias.package:
            status = "built in code"
        elif is_prepared(alias.name, args.cache_dir):
            status = f"ready at {alias_dir(alias.name, args.cache_dir)}"
        else:
            status = "not prepared (retain models --prepare NAME)"
        print(f"{alias.name:24s} {alias.kind:10s} {status}\n{'':24s} {alias.description}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from retain.cl.registry import method_specs

    for name, spec in sorted(method_specs().items()):
        print(f"{name:14s} {spec.summary}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from retain.cl.registry import get_spec
    from retain.hparams.coerce import field_help
    from retain.hparams.compat import NOT_APPLIED
    from retain.hparams.parser import GROUPS

    groups = list(GROUPS.items())
    if args.method:
        spec = get_spec(args.method)
        if spec.arguments:
            groups.append((f"method {args.method}", spec.arguments))
    for group, cls in groups:
        print(f"[{group}]")
        for key, default, text in field_help(cls):
            print(f"  {key} (default {default}): {text}")
    print(
        "[training] every transformers.TrainingArguments field (learning_rate, num_train_epochs, seed, ...)"
    )
    print("[LLaMA-Factory / EasyCL keys]")
    print("  dataset: the task sequence (same as cl_tasks)")
    print("  warmup_ratio: a share of the steps (written to warmup_steps as a float in [0, 1))")
    print("  stage: 'sft' only;  do_train: true (false is not used: `retain eval` evaluates)")
    for key, note in NOT_APPLIED.items():
        print(f"  {key}: {note}")
    return 0


def cmd_benchmarks(args: argparse.Namespace) -> int:
    from retain.data.benchmarks_info import describe_benchmarks

    print(describe_benchmarks(args.dir))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from retain.eval.compare import compare, parse_run_args, write_comparison

    summary = compare(parse_run_args(args.runs))
    print(write_comparison(args.out, summary))
    print(f"comparison: {Path(args.out) / 'comparison.md'}")
    return 0


def cmd_workflow(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from retain import workflow

    result, run_dir = workflow.run(args)
    if result is not None and PartialState().is_main_process:
        _print_result(result, run_dir)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from retain import study

    return study.main(args)


def cmd_export(args: argparse.Namespace) -> int:
    from retain import export

    return export.main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from retain.bench import run

    run(args)
    return 0


def _accept_global_flags(p: argparse.ArgumentParser) -> None:
    """--debug and --verbose also after the subcommand; SUPPRESS keeps a flag given before it."""
    for flag in ("--debug", "--verbose"):
        p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The command line. The sub-benchmarks' options are added only for `retain bench` (they import torch)."""
    parser = argparse.ArgumentParser(prog="retain", description="Continual learning for language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument(
        "--verbose", action="store_true", help="show the libraries' logs and warnings (hidden by default)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "train every task, evaluate after each, write metrics and the report"),
        ("train", "train every task and save each task's state (no evaluation)"),
        ("eval", "evaluate the saved task states and write metrics and the report"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", default=[], help="key=value overrides of the config")
        p.add_argument("--force", action="store_true", help="continue a run even if the config changed")
        _accept_global_flags(p)
    from retain.export import add_arguments as add_export_arguments
    from retain.study import add_arguments as add_study_arguments
    from retain.workflow import add_arguments as add_workflow_arguments

    for name, text, description, add_arguments in (
        (
            "cl_workflow",
            "EasyCL's command line: --mode train_only|eval_only|train_then_eval|full_workflow --train_params X.yaml",
            "Runs EasyCL's `cl_workflow` arguments as one retain run (see retain.workflow).",
            add_workflow_arguments,
        ),
        (
            "study",
            "a grid of runs from a spec: --list, --cell I, --lanes N, --report (benchmarks/studies/)",
            "Runs the cells of a study spec (methods x orders x seeds ...); see retain.study.",
            add_study_arguments,
        ),
        (
            "export",
            "write a run's trained weights as PEFT adapter folder(s), or with --merge as a full model",
            "Exports the state after a task of a finished or partial run (see retain.export).",
            add_export_arguments,
        ),
    ):
        p = sub.add_parser(name, help=text, description=description)
        add_arguments(p)
        _accept_global_flags(p)
    p = sub.add_parser("report", help="rebuild the report from a run's metrics.json")
    p.add_argument("run_dir")
    p = sub.add_parser("models", help="list the offline model aliases, or prepare them")
    p.add_argument("--prepare", nargs="+", metavar="NAME", help="fetch and convert these aliases now")
    p.add_argument("--cache-dir", default=None, help="cache root (default $RETAIN_CACHE or ~/.cache/retain)")
    sub.add_parser("methods", help="list the registered continual-learning methods")
    p = sub.add_parser(
        "benchmarks",
        help="list the benchmarks shipped with retain: orders, tasks, rows per split, label sets",
    )
    p.add_argument("--dir", help="also describe the benchmarks of this folder (with benchmark_info.json)")
    p = sub.add_parser("keys", help="list the accepted config keys with their help")
    p.add_argument("method", nargs="?", help="also list this method's keys")
    p = sub.add_parser(
        "compare",
        help="compare finished runs: mean and spread over seeds of each metric, per group",
        description="Runs named NAME_s1, NAME_s2 (or NAME_seed1, ...) form the group NAME; "
        "LABEL=RUN_DIR puts a run in the group LABEL.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or LABEL=RUN_DIR)")
    p.add_argument(
        "--out",
        default="comparison",
        help="folder for comparison.md/.json/.png, heatmaps.png, task_curves.png",
    )
    p = sub.add_parser(
        "bench",
        help="performance benchmarks: step-time, eval, scaling, cil (see benchmarks/README.md)",
        description="Performance benchmarks: medians over repeats, compared variants side by side in one run.",
    )
    if with_bench:
        from retain.bench import add_subcommands

        add_subcommands(p)
    return parser


class _StderrHandler(logging.Handler):
    """Writes to the current `sys.stderr` (not the one at setup time); retain's own lines read 'retain: ...'."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            own = record.name == "retain" or record.name.startswith("retain.")
            prefix = "retain" if own else f"{record.levelname} {record.name}"
            sys.stderr.write(f"{prefix}: {record.getMessage()}\n")
        except Exception:
            self.handleError(record)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def configure_console(verbose: bool) -> None:
    """Progress bars, the matrix, the metrics and retain's own notes; libraries' warnings only with --verbose."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR, handlers=[_StderrHandler()], force=True
    )
    logging.getLogger("retain").setLevel(logging.INFO if verbose else logging.WARNING)
    for name in ("httpx", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:
        # DeepSpeed logs to stdout through its own handler when transformers imports it.
        logging.getLogger("DeepSpeed").addFilter(_errors_only)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        for category in (FutureWarning, UserWarning, DeprecationWarning, RuntimeWarning):
            warnings.filterwarnings("ignore", category=category)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    configure_console("--verbose" in argv)  # before the bench parser imports the libraries
    args = build_parser(with_bench=command == "bench").parse_args(argv)
    handlers = {
        "run": lambda a: cmd_run(a, "run"),
        "train": lambda a: cmd_run(a, "train"),
        "eval": lambda a: cmd_run(a, "eval"),
        "report": cmd_report,
        "models": cmd_models,
        "methods": cmd_methods,
        "benchmarks": cmd_benchmarks,
        "keys": cmd_keys,
        "compare": cmd_compare,
        "bench": cmd_bench,
        "cl_workflow": cmd_workflow,
        "study": cmd_study,
        "export": cmd_export,
    }
    try:
        return handlers[args.command](args)
    except RetainError as exc:
        if args.debug:
            raise
        config = getattr(args, "config", None)
        where = f"{config}: " if exc.source is None and config else ""  # a config value caused it
        print(f"retain: error: {where}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retain: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """A process that exits with its group open can abort while the interpreter shuts down."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
