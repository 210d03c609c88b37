"""`retain bench write`: seconds to write pseudo-rows, with the two caches of the shared few-shot prefix.

What `pseudo_replay` and `ssr` do when a task ends: `--num-shots` real train rows of the task (a seeded
draw) in the few-shot prompt (`retain.cl.rehearsal.rows`), `--rows` sampled completions of it at
`--temperature` (top_p 0.95, top_k 40), each up to twice the tokens of the longest shot block. The
prompt is the prefix every row shares: it runs once, and each batch starts from its keys and values.
  static   the engine's default: the prefix copied into a preallocated cache of the batch's final
           length, so each decode step writes one position;
  dynamic  the prefix's dynamic cache repeated per row, grown by concatenation at every step (the
           engine before the preallocated cache).
Both draw with the same seeds; the JSON says whether they wrote the same text.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from retain.bench import common
from retain.errors import ConfigError
from retain.eval.predict import Sampling, generate_answers

NAME = "write"
HELP = "seconds to write pseudo-rows from a few-shot prompt: preallocated against growing prefix cache"
VARIANTS = ("static", "dynamic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common(parser, repeats=3)
    common.add_data(parser, lnt_tasks="dbpedia", demo_tasks="paint_colour")
    parser.add_argument("--rows", type=int, default=16, help="rows written per task (default 16)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows sampled together (default 16)")
    parser.add_argument("--num-shots", type=int, default=5, help="real rows in the prompt (default 5)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from retain.cl.rehearsal.base import TOP_K, TOP_P
    from retain.cl.rehearsal.rows import example_to_alpaca, few_shot_request
    from retain.data.tasks import load_tasks
    from retain.hparams.args import DataArguments, ModelArguments
    from retain.model.loader import load_model

    device = common.setup(args)
    if min(args.rows, args.batch_size, args.num_shots) < 1 or not args.temperature > 0:
        raise ConfigError("--rows, --batch-size and --num-shots must be at least 1, --temperature > 0")
    names = common.task_names(args)
    values = common.data_values(args, names)
    data = load_tasks(DataArguments(dataset_dir=values["dataset_dir"], cl_tasks=names, eval_max_samples=1))
    common.progress(f"{NAME}: loading {args.model}")
    model, tokenizer = load_model(ModelArguments(model_name_or_path=args.model))
    model.to(device).eval()
    sampling = Sampling(temperature=args.temperature, top_p=TOP_P, top_k=TOP_K, seed=args.seed)

    variants: dict[str, Any] = {}
    per_task: dict[str, dict[str, Any]] = {}
    for task in data:
        picks = random.Random(f"{args.seed}:{task.name}").sample(range(len(task.train)), args.num_shots)
        shots = [example_to_alpaca(task.train[i]) for i in picks]
        prompt, new_tokens = few_shot_request(tokenizer, shots)
        for variant in VARIANTS:
            variants[f"{task.name}:{variant}"] = lambda p=prompt, n=new_tokens, v=variant: generate_answers(
                model,
                tokenizer,
                [p] * args.rows,
                args.batch_size,
                n,
                sampling=sampling,
                return_finished=True,
                static_prefix=v == "static",
            )
        per_task[task.name] = {"prompt_tokens": len(prompt), "max_new_tokens": new_tokens}
    samples, results = common.interleave(variants, args.repeats, args.warmup, device, label=NAME)

    tasks, totals = {}, dict.fromkeys(VARIANTS, 0.0)
    for name, info in per_task.items():
        medians = {v: common.median(samples[f"{name}:{v}"]) for v in VARIANTS}
        texts = {v: results[f"{name}:{v}"][0] for v in VARIANTS}
        tasks[name] = {
            **info,
            "samples_s": {v: samples[f"{name}:{v}"] for v in VARIANTS},
            "medians_s": medians,
            "ratio_static_to_dynamic": medians["static"] / medians["dynamic"],
            "different_rows": sum(a != b for a, b in zip(texts["static"], texts["dynamic"], strict=True)),
        }
        for v in VARIANTS:
            totals[v] += medians[v]
    body = {
        "samples": samples,
        "tasks": tasks,
        "medians": totals,
        "ratios": {v: totals[v] / totals["dynamic"] for v in VARIANTS},
        "different_rows": sum(t["different_rows"] for t in tasks.values()),
    }
    settings = {
        "tasks": names,
        "data": args.data,
        "rows": args.rows,
        "batch_size": args.batch_size,
        "num_shots": args.num_shots,
        "temperature": args.temperature,
    }
    return common.report(NAME, args, device, settings, body, render)


def render(out: dict[str, Any]) -> str:
    rows = [
        [
            name,
            t["prompt_tokens"],
            t["max_new_tokens"],
            *t["medians_s"].values(),
            t["ratio_static_to_dynamic"],
        ]
        for name, t in out["tasks"].items()
    ]
    rows.append(["all", "", "", *out["medians"].values(), out["ratios"]["static"]])
    lines = [
        common.table(["task", "prompt tokens", "new tokens", "static s", "dynamic s", "static/dynamic"], rows)
    ]
    lines.append(f"rows written differently by the two caches: {out['different_rows']}")
    return "\n".join(lines)
