"""`retain export RUN_DIR --out DIR [--after K] [--merge]`: the trained weights in the formats users serve.

Without `--merge`: PEFT adapter folder(s), as the method defines them (`CLMethod.export`): `seq` and
the other one-adapter methods their adapter, `ilora` the evaluated (`ema`) adapter, stacked-LoRA
methods one LoRA merged from the stack, `peft` one folder per task adapter (with its head). With
`--merge`: each adapter added into the base weights, saved as a full transformers model folder
(docs/models.md says how to load both, with PEFT, LLaMA-Factory and vLLM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from retain.cl.registry import parse_config
from retain.errors import RetainError
from retain.hparams.parser import read_yaml
from retain.io import atomic_dir, atomic_write_json, make_writable_dir

CONFIG_FILE = "config.yaml"
#: Written into every export: what it holds (run, task, merged or not); it also marks a folder that a
#: later export may replace.
EXPORT_RECORD = "retain_export.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (with config.yaml and state.json)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument(
        "--after", type=int, metavar="K", help="the state after task K (default: the last trained)"
    )
    parser.add_argument(
        "--merge", action="store_true", help="merge into the base weights: a full model folder"
    )


def export_run(
    run_dir: str | Path, out: str | Path, after: int | None = None, merge: bool = False
) -> list[str]:
    """Export the state after task `after` of the run in `run_dir` into `out`; returns notes for the user."""
    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise RetainError("not a run folder (no config.yaml)", source=str(run_dir))
    check_out(out)
    config = parse_config(read_yaml(run_dir / CONFIG_FILE), source=str(run_dir / CONFIG_FILE))
    config.notes.clear()  # the run's own notes were shown when it ran
    # The task states are in output_dir (a continued run keeps its own folder in it), wherever that is now.
    states = run_dir if (config.cl.current_task_id or 1) == 1 else run_dir.parent
    origin = run_origin(states, config.training.output_dir)
    config.training.output_dir = str(states)
    with contextlib.chdir(origin):  # its other relative paths (dataset_dir, a local model) mean what they did
        return _export(config, run_dir, out, after, merge)


def _export(config: Any, run_dir: Path, out: Path, after: int | None, merge: bool) -> list[str]:
    from retain.model.export import save_merged_model
    from retain.training.sequence import Session

    session = Session(config)
    trained = sorted(session.state.trained)
    if not trained:
        raise RetainError("the run has no trained task yet", source=str(run_dir))
    task_id = trained[-1] if after is None else after
    if task_id not in trained:
        raise RetainError(
            f"task {task_id} is not trained in this run (trained: {trained})", source=str(run_dir)
        )
    session.load()
    session.restore(task_id)
    notes = []
    with atomic_dir(out) as tmp:
        folders = session.method.export(session.model, tmp)
        if merge:
            for folder in folders:
                adapter = json.loads((folder / "adapter_config.json").read_text())
                if adapter.get("peft_type") != "LORA" or adapter.get("task_type") != "CAUSAL_LM":
                    raise RetainError(
                        "only LoRA adapters of a causal LM merge into a full model (prompt tuning and "
                        "classifier heads stay adapters); export without --merge",
                        source=str(run_dir),
                    )
                merged = folder.with_name(folder.name + ".merged")
                notes += save_merged_model(config.model, session.tokenizer, folder, merged)
                for path in folder.iterdir():  # the full model takes the adapter folder's place
                    path.unlink()
                for path in merged.iterdir():
                    path.rename(folder / path.name)
                merged.rmdir()
        task = next(t.name for t in session.tasks if t.id == task_id)
        record = {"run_dir": str(run_dir), "after": task_id, "task": task, "merge": merge}
        atomic_write_json(tmp / EXPORT_RECORD, record)
    return list(dict.fromkeys(notes))


def run_origin(states: Path, output_dir: str) -> Path:
    """The folder the run was started from: its relative `output_dir` leads from there to `states`.
    The current folder when that cannot be told (an absolute `output_dir`, or a moved run folder)."""
    tail = Path(os.path.normpath(output_dir)).parts
    if (
        Path(output_dir).is_absolute()
        or ".." in tail
        or states.parts[len(states.parts) - len(tail) :] != tail
    ):
        return Path.cwd()
    return Path(*states.parts[: len(states.parts) - len(tail)])


def check_out(out: Path) -> None:
    """`--out` must be new, empty or an earlier export (which it replaces), and writable: an export
    replaces the whole folder, so any other existing file or folder is refused, untouched."""
    if out.exists() and not out.is_dir():
        raise RetainError(f"{out} is an existing file; an export is a folder", field="--out")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_RECORD).is_file():
        raise RetainError(
            f"{out} holds files and is not an earlier export (no {EXPORT_RECORD}); "
            "an export replaces the whole folder: choose a new one",
            field="--out",
        )
    make_writable_dir(out.parent, "--out")  # the export is built beside `out`, then renamed into place


def main(args: argparse.Namespace) -> int:
    for note in export_run(args.run_dir, args.out, args.after, args.merge):
        print(f"note: {note}")
    print(f"exported to {args.out}")
    return 0
