"""CIL evaluation time of the `peft` method with heads: every seen adapter (O(T)) vs hard routing.

Builds T synthetic sentence-level tasks, creates each task's adapter, head and the NewLoRA
router (untrained: the time does not depend on the weights), then times the CIL evaluation of
one task's test split after task T with `newlora_routing: all` and `hard`.

    python benchmarks/pertask_cil_eval.py --model all-minilm-l6-v2 --tasks 2 4 8 --rows 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from retain.eval.predict import EvalContext
from retain.hparams.parser import parse_config
from retain.training.sequence import Session


def write_tasks(root: Path, count: int, rows: int) -> list[str]:
    info, names = {}, []
    for t in range(count):
        name = f"task{t}"
        labels = [f"class{t}a", f"class{t}b", f"class{t}c"]
        data = [
            {
                "instruction": f"Task {t}: classify.",
                "input": f"sample {i} of task {t}",
                "output": labels[i % 3],
            }
            for i in range(rows)
        ]
        for split, part in ((name, data), (f"{name}_test", data)):
            (root / f"{split}.json").write_text(json.dumps(part))
            info[split] = {"file_name": f"{split}.json", "formatting": "alpaca"}
        names.append(name)
    (root / "dataset_info.json").write_text(json.dumps(info))
    return names


def time_cil(model_name: str, count: int, rows: int, batch_size: int, peft_type: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        names = write_tasks(root, count, rows)
        out: dict[str, float] = {}
        for routing in ("all", "hard"):
            values = {
                "model_name_or_path": model_name,
                "dataset_dir": str(root),
                "cl_tasks": ",".join(names),
                "cl_method": "peft",
                "PEFT_type": peft_type,
                "classifier": "Linear",
                "newlora_routing": routing,
                "per_device_eval_batch_size": batch_size,
                "output_dir": str(root / f"run_{routing}"),
                "cutoff_len": 128,
            }
            session = Session(parse_config(values))
            session.load()
            method, model = session.method, session.model
            for task, data in zip(session.tasks, session.data, strict=True):
                method.begin_task(model, task, data)
            method.end_task(model, session.tasks[-1], session.data[-1])
            model.to("cuda" if torch.cuda.is_available() else "cpu")
            ctx = EvalContext(session.tokenizer, session.builder, batch_size=batch_size, max_new_tokens=None)
            args = (model, session.tasks[-1], session.tasks[0], session.data[0], ctx)
            method.evaluate(*args)  # warm-up (the test split's tokenisation is cached after it)
            started = time.perf_counter()
            method.evaluate(*args)
            out[routing] = time.perf_counter() - started
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rows", type=int, default=256, help="test rows of the evaluated task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--peft-type", default="LoRA", choices=["LoRA", "PromptTuning"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"model {args.model}, {args.rows} test rows, batch {args.batch_size}, {args.peft_type}, {device}")
    print("| T | all (s) | hard (s) | all / hard |")
    print("|---|---|---|---|")
    for count in args.tasks:
        times = time_cil(args.model, count, args.rows, args.batch_size, args.peft_type)
        print(f"| {count} | {times['all']:.2f} | {times['hard']:.2f} | {times['all'] / times['hard']:.1f} |")


if __name__ == "__main__":
    main()
