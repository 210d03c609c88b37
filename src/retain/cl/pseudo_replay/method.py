"""pseudo_replay: `seq` plus rows the base model writes for every finished task, replayed with later tasks.

When task t ends (`end_task`, every process), `num_shots` real train rows of t (a seeded draw) go
into a few-shot prompt; the base model (`base_model_path`, by default the run's model with its
adapters disabled) samples `num_samples_per_task` completions at `generation_temperature`; each
completion's first block is parsed into an alpaca row (`retain.cl.rehearsal.rows`), malformed and
repeated ones are dropped and counted. The rows are kept (`memory`, saved with the task) and
written to `pseudo/<t>.json`; every later task trains on its own rows plus the rows of every
earlier task, mixed as `replay` mixes (concatenated; the Trainer shuffles). No real row is kept.
With `generate_for_last_task: false` nothing is written when the run's last task ends.
"""

from __future__ import annotations

from retain.cl.base import Task
from retain.cl.pseudo_replay import SPEC
from retain.cl.pseudo_replay.config import PseudoReplayArguments
from retain.cl.rehearsal.base import GenerativeRehearsal
from retain.cl.rehearsal.rows import alpaca_identity, keep_well_formed


class PseudoReplay(GenerativeRehearsal):
    spec = SPEC

    def __init__(self, config):
        super().__init__(config)
        self.args: PseudoReplayArguments

    def end_task(self, model, task: Task, data) -> None:
        args = self.args
        if args.num_samples_per_task == 0 or not self.writes_rows_of(task):
            self.memory[task.name] = []
            return

        def generate():
            candidates = self.few_shot_candidates(
                model,
                task,
                data,
                args.num_samples_per_task,
                args.num_shots,
                args.generation_temperature,
                True,
            )
            rows, counts = keep_well_formed(candidates, alpaca_identity)
            return rows, {task.name: counts}

        self.memory[task.name] = self.reuse_or_generate(
            task.name, self.fingerprint(model, task.name), generate
        )
