"""`retain bench cil`: CIL evaluation time of `peft` with heads at T = 2, 4, 8: all passes vs the router.

One `peft` run with classifier heads and the NewLoRA router trains the tasks in order (generated
sentence-level tasks of equal size by default, or the first tasks of an LNT order). Right after
task T (for each requested T) it times the class-incremental evaluation of the whole matrix row
(tasks 1..T, `--rows` test rows each) in three ways, interleaved:
  all   `newlora_routing: all`: every row runs through all T adapters and heads (T passes);
  hard  `newlora_routing: hard`: the router, on the adapter-free backbone's features, picks one
        task per row, and the row runs through that task's adapter and head (2 passes);
  soft  `newlora_routing: soft`: every adapter and head, as `all`, each head's log-softmax weighted
        by the router's weight for the row (T passes plus the router's: `all`'s cost).
It reports the times, all's and soft's over hard's, the CIL accuracy of each, and the router's task-
identification accuracy (the share of test rows routed to their own task), which bounds what
hard routing can reach.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from retain.bench import common
from retain.errors import ConfigError

NAME = "cil"
HELP = "CIL evaluation time of peft with heads at T = 2, 4, 8: every adapter (O(T)) vs router-selected"
ROUTINGS = ("all", "hard", "soft")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common(parser, model="all-minilm-l6-v2", repeats=3)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8], help="sequence lengths T")
    parser.add_argument(
        "--data",
        choices=("generated", "lnt"),
        default="generated",
        help="generated: equal-size synthetic tasks; lnt: the first T tasks of --order",
    )
    common.add_benchmark_dir(parser)
    parser.add_argument("--order", default="order1", help="LNT order for --data lnt (default order1)")
    parser.add_argument("--rows", type=int, default=64, help="test rows per task (default 64)")
    parser.add_argument("--train-rows", type=int, default=64, help="train rows per task (default 64)")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs per task (default 2)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="default 1e-3")
    parser.add_argument("--batch-size", type=int, default=64, help="eval batch size (default 64)")
    parser.add_argument("--train-batch-size", type=int, default=16, help="train batch size (default 16)")
    parser.add_argument("--peft-type", choices=("LoRA", "PromptTuning"), default="LoRA")
    parser.add_argument("--classifier", choices=("Linear", "CosineLinear"), default="Linear")
    parser.add_argument("--cutoff-len", type=int, default=128, help="tokens per row at most (default 128)")


def _data_values(args: argparse.Namespace, count: int, root: Path) -> dict[str, Any]:
    if args.data == "generated":
        names = common.write_generated_tasks(
            root, count, args.train_rows, args.rows, classes=3, seed=args.seed
        )
        return {"dataset_dir": str(root), "cl_tasks": ",".join(names)}
    from retain.data.registry import benchmark_tasks

    folder = common.lnt_folder(args)
    names = benchmark_tasks(folder, "LNT", args.order)
    if count > len(names):
        raise ConfigError(f"order {args.order} has {len(names)} tasks; --tasks asks for {count}")
    return {
        "dataset_dir": str(folder),
        "cl_tasks": ",".join(names[:count]),
        "max_samples": args.train_rows,
        "eval_max_samples": args.rows,
    }


def measuring_session(config: Any, lengths: set[int], measure: Any) -> Any:
    """A `Session` that calls `measure(session, T)` right after training task T, for T in `lengths`."""
    from retain.training.sequence import Session

    class MeasuringSession(Session):
        def train_task(self, task, data) -> None:
            common.progress(f"{NAME}: training task {task.id}/{len(self.tasks)}")
            super().train_task(task, data)
            if task.id in lengths:
                measure(self, task.id)

    return MeasuringSession(config)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from retain.cl.registry import parse_config

    device = common.setup(args)
    lengths = sorted(set(args.tasks))
    if not lengths or lengths[0] < 1:
        raise ConfigError("--tasks: sequence lengths must be at least 1")
    results: dict[str, dict[str, Any]] = {}

    def measure(session: Any, count: int) -> None:
        method, model = session.method, session.model
        trained, ctx = session.tasks[count - 1], session._eval_context()
        model.to(device)
        original = method.args.newlora_routing

        def evaluate_row(routing: str) -> list[Any]:
            method.args.newlora_routing = routing
            scores = []
            for task, data in zip(session.tasks[:count], session.data[:count], strict=True):
                with method.evaluation(model, trained, task):
                    scores.append(method.evaluate(model, trained, task, data, ctx))
            return scores

        try:
            variants = {routing: (lambda r=routing: evaluate_row(r)) for routing in ROUTINGS}
            samples, scores = common.interleave(
                variants, args.repeats, args.warmup, device, label=f"{NAME} T={count}"
            )
        finally:
            method.args.newlora_routing = original
        rows = [len(d.test) for d in session.data[:count]]
        examples = sum(rows)
        medians = {r: common.median(s) for r, s in samples.items()}
        routed = scores["hard"]
        results[str(count)] = {
            "samples_s": samples,
            "medians_s": medians,
            "examples": examples,
            "examples_per_s": {r: examples / m if m > 0 else None for r, m in medians.items()},
            "ratio_all_over_hard": medians["all"] / medians["hard"],
            "ratio_soft_over_hard": medians["soft"] / medians["hard"],
            # Share of all test rows routed to their own task (each task's share weighted by its rows).
            "router_accuracy": sum(s.extra["router_accuracy"] * n for s, n in zip(routed, rows, strict=True))
            / examples,
            "accuracy": {r: sum(s.accuracy for s in scores[r]) / count for r in ROUTINGS},
        }

    with tempfile.TemporaryDirectory(prefix="retain-bench-") as scratch:
        root = Path(scratch)
        values = {
            "model_name_or_path": args.model,
            **_data_values(args, max(lengths), root / "data"),
            "cl_method": "peft",
            "PEFT_type": args.peft_type,
            "classifier": args.classifier,
            "Sub_PEFT_type": "NewLoRA",
            "il_mode": "CIL",
            "newlora_routing": "hard",
            "cutoff_len": args.cutoff_len,
            "per_device_train_batch_size": args.train_batch_size,
            "per_device_eval_batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.epochs,
            "seed": args.seed,
            "disable_tqdm": True,
            "output_dir": str(root / "run"),
            **({"use_cpu": True} if device.type == "cpu" else {}),
        }
        session = measuring_session(parse_config(values), set(lengths), measure)
        common.progress(f"{NAME}: peft with {args.classifier} heads and the NewLoRA router on {args.model}")
        with common.quiet():
            session.run(train=True, evaluate=False)

    medians = {count: r["medians_s"] for count, r in results.items()}
    ratios = {count: r["ratio_all_over_hard"] for count, r in results.items()}
    settings = {
        "lengths": lengths,
        "data": args.data,
        "order": args.order if args.data == "lnt" else None,
        "rows": args.rows,
        "train_rows": args.train_rows,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "train_batch_size": args.train_batch_size,
        "peft_type": args.peft_type,
        "classifier": args.classifier,
        "cutoff_len": args.cutoff_len,
        "seed": args.seed,
    }
    samples = {count: r["samples_s"] for count, r in results.items()}
    body = {"samples": samples, "results": results, "medians": medians, "ratios": ratios}
    return common.report(NAME, args, device, settings, body, render)


def render(out: dict[str, Any]) -> str:
    rows = []
    for count, r in out["results"].items():
        rows.append(
            [
                int(count),
                r["examples"],
                r["medians_s"]["all"],
                r["medians_s"]["hard"],
                r["medians_s"]["soft"],
                r["ratio_all_over_hard"],
                r["ratio_soft_over_hard"],
                100 * r["router_accuracy"],
                100 * r["accuracy"]["all"],
                100 * r["accuracy"]["hard"],
                100 * r["accuracy"]["soft"],
            ]
        )
    return common.table(
        [
            "T",
            "test rows",
            "all s",
            "hard s",
            "soft s",
            "all / hard",
            "soft / hard",
            "router acc %",
            "CIL acc all %",
            "CIL acc hard %",
            "CIL acc soft %",
        ],
        rows,
    )
