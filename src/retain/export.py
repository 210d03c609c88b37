"""`retain export RUN_DIR --out DIR [--after K] [--merge]`: the trained weights in the formats users serve.

Without `--merge`: PEFT adapter folder(s), as the method defines them (`CLMethod.export`): `seq` and
the other one-adapter methods their adapter, `ilora` the evaluated (`ema`) adapter, stacked-LoRA
methods one LoRA merged from the stack, `peft` one folder per task adapter (with its head). With
`--merge`: each adapter added into the base weights, saved as a full transformers model folder
(docs/models.md says how to load both, with PEFT, LLaMA-Factory and vLLM).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retain.cl.registry import parse_config
from retain.errors import RetainError
from retain.hparams.parser import read_yaml
from retain.io import atomic_dir

CONFIG_FILE = "config.yaml"


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
    from retain.model.export import save_merged_model
    from retain.training.sequence import Session

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / CONFIG_FILE).is_file():
        raise RetainError("not a run folder (no config.yaml)", source=str(run_dir))
    config = parse_config(read_yaml(run_dir / CONFIG_FILE), source=str(run_dir / CONFIG_FILE))
    config.notes.clear()  # the run's own notes were shown when it ran
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
    return list(dict.fromkeys(notes))


def main(args: argparse.Namespace) -> int:
    for note in export_run(args.run_dir, args.out, args.after, args.merge):
        print(f"note: {note}")
    print(f"exported to {args.out}")
    return 0
