"""`retain bench eval`: examples per second of evaluation, against naive generation and the floor.

On the same test prompts of each task (LNT agnews by default), with the base model:
  naive    `model.generate` one prompt at a time (batch 1);
  batched  plain batched greedy generation: longest prompts first, left padding, no prefix cache
           (`generate_answers(share_prefix=False)`);
  ours     the evaluator every run uses (`generate_answers(share_prefix=True)`): the prompt prefix all
           rows share is run once and its KV cache reused by every batch;
  floor    one prefill forward pass over the same prompts in the same batches, no decoding;
  cached   the cross-run base-row cache (`retain.eval.base_cache`) answering the entry: key
           computation and file read, no model call (row 0 of the matrix in a repeated run);
  choice   `eval_mode: choice` (`retain.eval.choice`): every label scored by its log-likelihood
           after the prompt, with the shared prefix cache (when every task has a label set).
Ratios are times relative to the floor. `ours` must give exactly the predictions of `batched`.
The matrix estimate adds up a run over exactly these tasks (eval_scope all: T+1 rows of T
entries) with plain batched generation, with ours, and with ours plus the cached base row.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from retain.bench import common
from retain.data.prompt import normalize_answer, pad_batch
from retain.errors import ConfigError
from retain.eval.choice import choice_predictions
from retain.eval.predict import EvalContext, common_prefix_length, generate_answers, score

NAME = "eval"
HELP = "evaluation examples/s: naive and batched generate, ours, the prefill floor, the base-row cache"
VARIANTS = ("naive", "batched", "ours", "floor", "cached", "choice")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common(parser, repeats=3)
    common.add_data(parser, lnt_tasks="agnews", demo_tasks="paint_colour")
    parser.add_argument("--rows", type=int, default=50, help="test rows per task (default 50)")
    parser.add_argument(
        "--train-rows",
        type=int,
        default=200,
        help="train rows per task: the longest train answer sets the new tokens (default 200, as in runs)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="eval batch size (default 16)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens generated per prompt (default: the engine's rule, longest train answer + EOS + 1)",
    )
    parser.add_argument("--template", choices=("auto", "plain"), default="auto", help="prompt format")
    parser.add_argument(
        "--skip-naive", action="store_true", help="leave out batch-1 generation (slow with big test sets)"
    )


@torch.no_grad()
def naive_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out.append(tokenizer.decode(tokens[0, ids.size(1) :], skip_special_tokens=True))
    return out


@torch.no_grad()
def prefill_floor(model, tokenizer, prompts: list[list[int]], batch_size: int) -> int:
    """One forward pass over every prompt, batched as `generate_answers` batches them; no decoding."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    tokens = 0
    for start in range(0, len(order), batch_size):
        rows = [{"input_ids": prompts[i]} for i in order[start : start + batch_size]]
        batch = pad_batch(rows, tokenizer.pad_token_id, "left", ("input_ids",))
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
        tokens += ids.numel()
    return tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    from retain.data.prompt import PromptBuilder
    from retain.data.tasks import load_tasks
    from retain.eval.base_cache import BaseRowEntry, base_model_id
    from retain.hparams.args import DataArguments, ModelArguments
    from retain.model.loader import load_model

    device = common.setup(args)
    names = common.task_names(args)
    if args.rows < 1 or args.batch_size < 1:
        raise ConfigError("--rows and --batch-size must be at least 1")
    values = common.data_values(args, names)
    data = load_tasks(
        DataArguments(
            dataset_dir=values["dataset_dir"],
            cl_tasks=names,
            max_samples=args.train_rows,
            eval_max_samples=args.rows,
            template=args.template,
        )
    )
    model_args = ModelArguments(model_name_or_path=args.model)
    common.progress(f"{NAME}: loading {args.model}")
    logging.getLogger("retain.eval.base_cache").setLevel(logging.WARNING)  # one line per cache hit
    model, tokenizer = load_model(model_args)
    model_id = base_model_id(model_args, model)
    model.to(device).eval()
    builder = PromptBuilder(tokenizer, args.template)
    ctx = EvalContext(tokenizer, builder, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    variants: dict[str, Any] = {}
    per_task: dict[str, dict[str, Any]] = {}
    with_choice = all(task.label_texts for task in data)
    with tempfile.TemporaryDirectory(prefix="retain-bench-cache-") as cache_root:
        for task in data:
            prompts = [builder.prompt_ids(e) for e in task.test]
            new_tokens = ctx.new_tokens_for(task)
            name = task.name

            def entry(task=task):
                return BaseRowEntry.open(model_id, "generative", task, ctx, device, root=Path(cache_root))

            def ours(prompts=prompts, new_tokens=new_tokens):
                return generate_answers(
                    model, tokenizer, prompts, args.batch_size, new_tokens, share_prefix=True
                )

            with common.quiet():
                first = ours()  # also fills the cache entry that `cached` reads
            gold = [e.answer for e in task.test]
            stored = score(first, gold, task.labels)
            stored.predictions = first  # as generative_score keeps them
            entry().store(stored)
            if not args.skip_naive:
                variants[f"{name}:naive"] = lambda p=prompts, n=new_tokens: naive_generate(
                    model, tokenizer, p, n
                )
            variants[f"{name}:batched"] = lambda p=prompts, n=new_tokens: generate_answers(
                model, tokenizer, p, args.batch_size, n, share_prefix=False
            )
            variants[f"{name}:ours"] = ours
            variants[f"{name}:floor"] = lambda p=prompts: prefill_floor(model, tokenizer, p, args.batch_size)
            variants[f"{name}:cached"] = lambda entry=entry: entry().load()
            if with_choice:
                variants[f"{name}:choice"] = lambda task=task: choice_predictions(model, task, ctx)
            per_task[name] = {
                "examples": len(prompts),
                "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
                "shared_prefix_tokens": common_prefix_length(prompts),
                "max_new_tokens": new_tokens,
                "gold": gold,
                "labels": task.labels,
            }
        samples, results = common.interleave(variants, args.repeats, args.warmup, device, label=NAME)

    body = summarise(args, per_task, samples, results)
    settings = {
        "tasks": names,
        "data": args.data,
        "rows": args.rows,
        "train_rows": args.train_rows,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "template": args.template,
        "variants": measured_variants(args, with_choice),
    }
    return common.report(NAME, args, device, settings, body, render)


def measured_variants(args: argparse.Namespace, with_choice: bool) -> list[str]:
    return [v for v in VARIANTS if not (v == "naive" and args.skip_naive) and (v != "choice" or with_choice)]


def summarise(
    args: argparse.Namespace,
    per_task: dict[str, dict[str, Any]],
    samples: dict[str, list[float]],
    results: dict[str, Any],
) -> dict[str, Any]:
    variants = measured_variants(args, all(f"{name}:choice" in samples for name in per_task))
    tasks: dict[str, Any] = {}
    totals = dict.fromkeys(variants, 0.0)
    examples = 0
    for name, info in per_task.items():
        gold, labels = info.pop("gold"), info.pop("labels")
        task_samples = {v: samples[f"{name}:{v}"] for v in variants}
        medians = {v: common.median(s) for v, s in task_samples.items()}
        batched, ours = results[f"{name}:batched"], results[f"{name}:ours"]
        mismatches = {"ours_vs_batched": sum(a != b for a, b in zip(ours, batched, strict=True))}
        accuracy = {
            "batched": score(batched, gold, labels).accuracy,
            "ours": score(ours, gold, labels).accuracy,
        }
        if "choice" in variants:
            chosen = results[f"{name}:choice"]
            accuracy["choice"] = score(chosen, gold, labels).accuracy
            mismatches["choice_vs_ours_labels"] = sum(
                normalize_answer(c) != normalize_answer(o) for c, o in zip(chosen, ours, strict=True)
            )
        if "naive" in variants:
            naive = results[f"{name}:naive"]
            mismatches["naive_vs_batched"] = sum(a != b for a, b in zip(naive, batched, strict=True))
            accuracy["naive"] = score(naive, gold, labels).accuracy
        cached = results[f"{name}:cached"]
        tasks[name] = {
            **info,
            "samples_s": task_samples,
            "medians_s": medians,
            "examples_per_s": {v: info["examples"] / m if m > 0 else None for v, m in medians.items()},
            "ratios_to_floor": {v: m / medians["floor"] for v, m in medians.items()},
            "identical_predictions": mismatches["ours_vs_batched"] == 0,
            "mismatches": mismatches,
            "accuracy": accuracy,
            "cached_entry_matches": cached is not None and cached.predictions == ours,
        }
        for v in variants:
            totals[v] += medians[v]
        examples += info["examples"]
    count = len(per_task)
    matrix = {
        "tasks": count,
        "batched_s": (count + 1) * totals["batched"],
        "ours_s": (count + 1) * totals["ours"],
        "ours_with_cached_base_row_s": count * totals["ours"] + totals["cached"],
    }
    matrix["saving_vs_batched"] = 1 - matrix["ours_with_cached_base_row_s"] / matrix["batched_s"]
    return {
        "samples": samples,
        "tasks": tasks,
        "medians": totals,
        "examples": examples,
        "examples_per_s": {v: examples / t if t > 0 else None for v, t in totals.items()},
        "ratios": {v: t / totals["floor"] for v, t in totals.items()},
        "identical_predictions": all(t["identical_predictions"] for t in tasks.values()),
        "matrix_estimate": matrix,
    }


def render(out: dict[str, Any]) -> str:
    lines = []
    for name, info in out["tasks"].items():
        lines.append(
            f"{name}: {info['examples']} prompts, {info['prompt_tokens_mean']:.0f} tokens on average "
            f"({info['shared_prefix_tokens']} shared), {info['max_new_tokens']} new tokens; "
            f"ours == batched: {info['identical_predictions']}, mismatches {info['mismatches']}"
        )
    rows = [
        [v, out["medians"][v], out["examples_per_s"][v], out["ratios"][v]]
        for v in out["settings"]["variants"]
    ]
    lines.append(common.table(["variant", "seconds", "examples/s", "x floor"], rows))
    m = out["matrix_estimate"]
    lines.append(
        f"matrix of these {m['tasks']} task(s), eval_scope all: batched {m['batched_s']:.3g} s, ours "
        f"{m['ours_s']:.3g} s, ours + cached base row {m['ours_with_cached_base_row_s']:.3g} s "
        f"({100 * m['saving_vs_batched']:.0f}% less than batched)"
    )
    return "\n".join(lines)
