"""`retain bench step-time`: one training step of each method, relative to `seq`, in one process.

Each method gets its own copy of the model, set up through the engine exactly as a run sets it
up (`Session.load`, the method's hooks). Task 1 is trained for `--prep-steps` steps and ended
(this fills replay memories and buffers the way a run does), then task 2 begins and its steps
are timed. A step is what `CLTrainer` does per optimizer step, minus data loading and logging:
`begin_step`, the method's `compute_loss`, backward, gradient clipping, AdamW, and the method's
step callbacks (I-LoRA's buffer update and EMA update).

Equal batch: every method steps on `--batch-size` rows; `seq`, `ilora` and `peft` on the same
current-task rows. Equal replay: I-LoRA replays `--batch-size` buffer rows with each batch
(`ilora_replay_batch_size`), and `replay` mixes its memory into the task's rows at
`--replay-mix-ratio` (1.0: as many replayed rows as current ones, the same replay volume as I-LoRA),
so its batches hold fewer current rows; the `per current row` column charges it for that.
`peft` is the generative per-task LoRA with the same rank, alpha and dropout as the others.

Floors: the matmul FLOPs of each method's step on the batches actually used, relative to `seq`'s
(`retain.bench.flops`), with frozen base weights and with the textbook backward = 2 x forward.
For I-LoRA a measured floor is added: a `seq` step on I-LoRA's joined batch (current + replayed
rows) plus I-LoRA's no-grad EMA pass through the body, relative to the `seq` step.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerControl, TrainerState

from retain.bench import common
from retain.bench.flops import (
    DecoderShape,
    batch_dims,
    body_forward_flops,
    forward_flops,
    lora_forward_flops,
    train_step_flops,
)
from retain.cl.loss import LossScale
from retain.data.prompt import IGNORE_INDEX, pad_batch
from retain.errors import ConfigError

NAME = "step-time"
HELP = "training step time and peak memory of each method, relative to seq"
DEFAULT_METHODS = "seq,replay,ilora,peft"
#: I-LoRA's measured floors: their components, timed as extra variants. The split pass costs a seq step
#: on the current rows, one on the replayed rows and the EMA pass; the joined pass one seq step on the
#: two batches joined (padded to one width) and the EMA pass.
JOINED, REPLAY, EMA_PASS = (
    "ilora.seq_step_on_joined_batch",
    "ilora.seq_step_on_replay_batch",
    "ilora.ema_body_pass",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common(parser)
    common.add_data(parser, lnt_tasks="agnews,MNLI", demo_tasks="paint_colour,flag_colour")
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"registered methods, and ilora_joined (I-LoRA with its joined pass); default {DEFAULT_METHODS}",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    common.add_cutoff(parser)
    parser.add_argument("--rows", type=int, default=64, help="train rows loaded per task (default 64)")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of every method (default 8)")
    parser.add_argument("--replay-mix-ratio", type=float, default=1.0, help="replayed rows per current row")
    parser.add_argument(
        "--prep-steps", type=int, default=2, help="steps on task 1 that fill buffers (default 2)"
    )
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=2,
        help="extra steps per method measured for peak memory, apart from the timed ones (default 2; 0: skip)",
    )


def method_values(name: str, args: argparse.Namespace) -> dict[str, Any]:
    rank = args.lora_rank
    if name == "replay":
        return {"cl_method": name, "lora_rank": rank, "replay_mix_ratio": args.replay_mix_ratio}
    if name in ILORA:
        return {
            "cl_method": "ilora",
            "lora_rank": rank,
            "ilora_replay_batch_size": args.batch_size,
            "ilora_pass": "joined" if name == "ilora_joined" else "split",
        }
    if name == "peft":
        return {
            "cl_method": name,
            "PEFT_type": "LoRA",
            "PEFT_lora_r": rank,
            "PEFT_lora_alpha": 2 * rank,
            "PEFT_lora_dropout": 0.0,
        }
    if name in REHEARSAL_ROWS:  # a batch of written rows per earlier task: the step, not the writing
        return {"cl_method": name, "lora_rank": rank, **REHEARSAL_ROWS[name](args.batch_size)}
    return {"cl_method": name, "lora_rank": rank}


#: `ilora_joined` is I-LoRA with its joined plastic pass, timed beside `ilora` (the split pass by default).
ILORA = ("ilora", "ilora_joined")

#: The generative methods write this few rows per earlier task in the benchmark; their writing time per
#: task is reported by a run (`method_info` in metrics.json), not by the step time.
REHEARSAL_ROWS = {
    "lamol": lambda rows: {"lamol_num_samples_per_task": rows},
    "pseudo_replay": lambda rows: {"num_samples_per_task": rows},
    "ssr": lambda rows: {"pseudo_sample_memory": rows, "n_clusters": min(rows, 4)},
}


class MethodStep:
    """One method on its own model copy, stepping through the engine's hooks."""

    def __init__(self, name: str, values: dict[str, Any], device: torch.device, seed: int, batch_size: int):
        from retain.cl.registry import parse_config
        from retain.training.sequence import Session

        self.name = name
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.session = Session(parse_config(values))
        with common.quiet():
            self.session.load()
        self.method = self.session.method
        self.model = self.session.model.to(device)
        self.args = self.session.config.training
        self.index: int | None = None

    def begin(self, index: int) -> None:
        """Begin task `index` (0-based): the method's `begin_task`, a fresh optimizer, a fixed batch."""
        session, method = self.session, self.method
        self.index = index
        task, data = session.tasks[index], session.data[index]
        method.begin_task(self.model, task, data)
        rows = method.training_rows(task, data.train_rows)
        order = list(range(len(rows)))
        random.Random(self.seed).shuffle(order)
        chosen = order[: self.batch_size]
        if len(chosen) < self.batch_size:
            raise ConfigError(f"task {task.name} has fewer than --batch-size={self.batch_size} train rows")
        self.current_fraction = len(data.train_rows) / len(rows)  # replay mixes memory rows in
        collate = method.collator(session.tokenizer)
        self.batch = self.to_device(collate([rows[i] for i in chosen]))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.args.learning_rate, weight_decay=self.args.weight_decay
        )
        self.callbacks = method.callbacks(self.model)
        self.state, self.control = TrainerState(), TrainerControl()
        self.model.train()

    def end(self) -> None:
        assert self.index is not None
        self.model.eval()
        self.method.end_task(self.model, self.session.tasks[self.index], self.session.data[self.index])

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def step(self, batch: dict[str, torch.Tensor] | None = None) -> None:
        """One optimizer step on `batch` (default: the task's fixed batch)."""
        batch = self.batch if batch is None else batch
        method, args = self.method, self.args
        method.begin_step([batch])
        for callback in self.callbacks:
            callback.on_step_begin(args, self.state, self.control)
        num_items = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        for part in method.loss_parts(self.model, batch, LossScale(num_items=num_items)):
            part().backward()  # as CLTrainer does: each part's activations are freed before the next
        torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
        for callback in self.callbacks:  # where gradient projection (GEM, A-GEM) runs, as in the Trainer
            callback.on_pre_optimizer_step(
                args, self.state, self.control, model=self.model, optimizer=self.optimizer
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        for callback in self.callbacks:
            callback.on_step_end(args, self.state, self.control)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from retain.cl.registry import method_specs

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = {*method_specs(), *ILORA}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"--methods: unknown method '{unknown[0]}'; available: {', '.join(sorted(known))}")
    device = common.setup(args)
    if "seq" not in names:
        names.insert(0, "seq")
    tasks = common.task_names(args)
    if len(tasks) < 2:
        raise ConfigError(
            "--tasks needs two tasks at least: the earlier ones fill memories, the last is timed"
        )
    if min(args.batch_size, args.prep_steps, args.rows) < 1:
        raise ConfigError("--batch-size, --prep-steps and --rows must be at least 1")
    B = args.batch_size
    with tempfile.TemporaryDirectory(prefix="retain-bench-") as scratch:
        base = {
            "model_name_or_path": args.model,
            **common.data_values(args, tasks),
            "max_samples": args.rows,
            "eval_max_samples": 1,
            "per_device_train_batch_size": B,
            "learning_rate": 1e-4,
            "seed": args.seed,
            "disable_tqdm": True,
            "eval_base_cache": False,
        }
        if args.cutoff_len is None:
            args.cutoff_len = common.fitting_cutoff(base)
        base["cutoff_len"] = args.cutoff_len
        common.progress(f"{NAME}: loading {len(names)} model copies ({args.model})")
        runners = {
            name: MethodStep(
                name,
                {**base, **method_values(name, args), "output_dir": str(Path(scratch) / name)},
                device,
                args.seed,
                B,
            )
            for name in names
        }
        earlier = len(tasks) - 1
        common.progress(
            f"{NAME}: {args.prep_steps} step(s) of each of {earlier} earlier task(s), then the last"
        )
        for runner in runners.values():  # earlier tasks: a few real steps, then their end (memories fill)
            with common.quiet():
                for index in range(earlier):
                    runner.begin(index)
                    for _ in range(args.prep_steps):
                        runner.step()
                    runner.end()
                runner.begin(earlier)

        variants = {name: runner.step for name, runner in runners.items()}
        extra: dict[str, Any] = {}
        ilora = next((runners[name] for name in ILORA if name in runners), None)
        if ilora is not None:
            rows = ilora.method.buffer.sample(B, random.Random(args.seed))
            if len(rows) < B:
                raise ConfigError("I-LoRA's buffer holds fewer rows than --batch-size: raise --prep-steps")
            from retain.cl.ilora.ilora_math import concat_right_padded

            pad = ilora.session.tokenizer.pad_token_id
            replay = ilora.to_device(pad_batch(rows, pad, side="right"))
            joined = concat_right_padded(runners["seq"].batch, replay, pad)
            extra = {"replay": replay, "joined": joined}
            variants[JOINED] = lambda: runners["seq"].step(joined)
            variants[REPLAY] = lambda: runners["seq"].step(replay)
            variants[EMA_PASS] = lambda: ilora.method.stable_hidden_states(replay)

        samples, _ = common.interleave(variants, args.repeats, args.warmup, device, label=NAME)
        memory: dict[str, list[int]] = {name: [] for name in names}
        memory_method = None
        for index in range(max(args.memory_repeats, 0)):
            common.progress(f"{NAME}: peak memory {index + 1}/{args.memory_repeats}")
            for name in names:
                with common.quiet(), common.PeakMemory(device) as peak:
                    runners[name].step()
                memory[name].append(peak.peak_bytes)
                memory_method = peak.method

        body = summarise(args, names, runners, samples, memory, memory_method, extra)
    settings = {
        "methods": names,
        "tasks": tasks,
        "data": args.data,
        "batch_size": B,
        "replay_batch_size": B,
        "replay_mix_ratio": args.replay_mix_ratio,
        "cutoff_len": args.cutoff_len,
        "lora_rank": args.lora_rank,
        "prep_steps": args.prep_steps,
        "memory_repeats": args.memory_repeats,
        "seed": args.seed,
    }
    return common.report(NAME, args, device, settings, body, render)


def summarise(
    args: argparse.Namespace,
    names: list[str],
    runners: dict[str, MethodStep],
    samples: dict[str, list[float]],
    memory: dict[str, list[int]],
    memory_method: str | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    B = args.batch_size
    step_medians = {name: common.median(values) for name, values in samples.items()}
    seq_time = step_medians["seq"]
    mem_medians = {name: common.median(values) if values else None for name, values in memory.items()}
    seq_mem = mem_medians.get("seq")
    rows_per_step: dict[str, dict[str, float]] = {}
    for name in names:
        if name in ILORA:  # B current rows plus a replay batch of B buffer rows
            current, replayed = float(B), float(B)
        else:  # B rows, of which replay's memory supplies a share (expected over the task)
            current = B * runners[name].current_fraction
            replayed = B - current
        rows_per_step[name] = {"rows": current + replayed, "current": current, "replayed": replayed}
    ratios = {
        "step_s": {name: step_medians[name] / seq_time for name in names},
        "peak_bytes": {
            name: (mem_medians[name] / seq_mem if seq_mem and mem_medians[name] is not None else None)
            for name in names
        },
        "per_current_row": {
            name: step_medians[name] / seq_time * (B / rows_per_step[name]["current"]) for name in names
        },
    }
    floors = flop_floors(names, runners, extra, earlier=len(runners["seq"].session.tasks) - 1)
    for name in ILORA:
        if name in floors and JOINED in step_medians:
            passes = (
                (seq_time, step_medians[REPLAY]) if runners[name].method.split else (step_medians[JOINED],)
            )
            floors[name]["measured_ratio"] = (sum(passes) + step_medians[EMA_PASS]) / seq_time
    return {
        "methods": names,
        "samples": {"step_s": samples, "peak_bytes": memory},
        "medians": {"step_s": step_medians, "peak_bytes": mem_medians},
        "ratios": ratios,
        "floors": floors,
        "rows_per_step": rows_per_step,
        "memory_method": memory_method,
        # The methods' own figures from the earlier tasks (InfLoRA's subspace steps, the generative
        # methods' writing time), timed apart from the steps.
        "method_info": {name: info for name, r in runners.items() if (info := r.method.report_info())},
    }


#: Extra passes per step beyond seq's forward + backward, for the FLOP floors (see flop_floors).
SAME_AS_SEQ = ("seq", "replay", "peft", "ewc", "multitask", "pseudo_replay", "ssr")
STACKED = ("olora", "nlora", "inflora")


def flop_floors(
    names: list[str], runners: dict[str, MethodStep], extra: dict[str, Any], earlier: int
) -> dict[str, Any]:
    """Matmul FLOPs of each method's step on its batch, relative to seq's (decoders with a known shape).

    seq, replay, peft, ewc (an elementwise penalty), multitask and the rehearsal methods that only mix
    rows in: one forward and backward of the batch. lwf: plus a no-grad forward of the teacher. gem: plus
    one forward and backward per earlier task (its reference gradients); agem: plus one. ilora: the
    joined batch plus the EMA body pass. Stacked LoRAs: plus the earlier tasks' LoRAs, forward and the
    input gradients through them (nlora's L1 penalty, once per step, is not counted).
    """
    config = getattr(runners["seq"].session.model, "config", None)
    shape = DecoderShape.from_config(config) if config is not None else None
    if shape is None:
        return {}
    per_method: dict[str, tuple[float, float]] = {}
    for name in names:
        batch = runners[name].batch
        step, textbook = train_step_flops(shape, batch), train_step_flops(shape, batch, frozen=False)
        rows, width, kept = batch_dims(batch)
        if name in ILORA:
            if "joined" not in extra:
                continue
            ema = body_forward_flops(shape, extra["replay"])
            passes = (batch, extra["replay"]) if runners[name].method.split else (extra["joined"],)
            step = sum(train_step_flops(shape, b) for b in passes) + ema
            textbook = sum(train_step_flops(shape, b, frozen=False) for b in passes) + ema
        elif name == "lwf":
            teacher = forward_flops(shape, rows, width, kept)
            step, textbook = step + teacher, textbook + teacher
        elif name in ("gem", "agem"):
            references = earlier if name == "gem" else 1
            step, textbook = step * (1 + references), textbook * (1 + references)
        elif name in STACKED:
            # The earlier tasks' (frozen) LoRAs: their forward, and the input gradients through them.
            rank = runners[name].session.config.finetuning.lora_rank
            lora = 2 * earlier * lora_forward_flops(shape, rows * width, rank)
            step, textbook = step + lora, textbook + lora
        elif name not in SAME_AS_SEQ:
            continue
        per_method[name] = (step, textbook)
    seq_flops, seq_textbook = per_method["seq"]
    return {
        name: {"flops": flops, "flop_ratio": flops / seq_flops, "textbook_ratio": textbook / seq_textbook}
        for name, (flops, textbook) in per_method.items()
    }


def render(out: dict[str, Any]) -> str:
    medians, ratios, floors = out["medians"], out["ratios"], out["floors"]
    rows = []
    for name in out["methods"]:
        per_step = out["rows_per_step"][name]
        floor = floors.get(name, {})
        rows.append(
            [
                name,
                f"{per_step['current']:g}+{per_step['replayed']:g}",
                medians["step_s"][name],
                ratios["step_s"][name],
                floor.get("flop_ratio"),
                floor.get("textbook_ratio"),
                floor.get("measured_ratio"),
                ratios["per_current_row"][name],
                common.mib(medians["peak_bytes"][name]),
                ratios["peak_bytes"][name],
            ]
        )
    text = common.table(
        [
            "method",
            "rows cur+replay",
            "step s",
            "x seq",
            "FLOP floor",
            "textbook floor",
            "measured floor",
            "x seq per current row",
            "peak MiB",
            "mem x seq",
        ],
        rows,
    )
    notes = [
        "FLOP floor: matmul FLOPs vs seq's, frozen base (backward = input gradients only); textbook: backward = "
        "2 x forward. measured floor, over seq: ilora (split) a seq step on each half + the EMA body pass; "
        "ilora_joined a seq step on the joined batch + the EMA body pass.",
        f"peak memory: bytes allocated above the level before the step ({out['memory_method']}).",
    ]
    return text + "\n" + "\n".join(notes)
