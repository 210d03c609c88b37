"""`GenerativeRehearsal`: the `Seq` subclass `lamol`, `pseudo_replay` and `ssr` build on.

It holds the pseudo-rows of earlier tasks as alpaca dicts (`memory`, saved with each task as JSON),
mixes them into each later task's training rows, generates with `retain.eval.predict.generate_answers`
(batched, with the prompt-prefix cache and a progress bar; seeded sampling that leaves the global
random state alone and gives every process the same rows), writes each generation to
`<output_dir>/pseudo/` and reuses a file there instead of generating again when a resumed run meets
the same settings and weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import PartialState

from retain.cl.base import Task
from retain.cl.rehearsal.files import PseudoFiles, load_state, save_state
from retain.cl.rehearsal.rows import (
    PseudoRow,
    alpaca_to_example,
    derived_seed,
    example_to_alpaca,
    few_shot_request,
    parse_few_shot_completion,
)
from retain.cl.seq.method import Seq
from retain.data.prompt import IGNORE_INDEX
from retain.eval.predict import Sampling, generate_answers
from retain.model.adapters import adapter_parameters

logger = logging.getLogger(__name__)

#: Nucleus and top-k filtering of every sampled generation (EasyCL's values for its three methods).
TOP_P = 0.95
TOP_K = 40


class GenerativeRehearsal(Seq):
    """`seq` plus pseudo-rows of earlier tasks, mixed into every later task's training rows."""

    #: The config key of a second folder every pseudo file is copied to (EasyCL's key).
    samples_dir_key: ClassVar[str] = "pseudo_samples_dir"

    def __init__(self, config):
        super().__init__(config)
        self.builder = None
        self.cutoff_len = config.data.cutoff_len
        #: Pseudo-rows of finished tasks, by task name, in task order (pseudo_replay, ssr).
        self.memory: dict[str, list[PseudoRow]] = {}
        #: Per pseudo file: counts, seconds, fingerprint (as in `pseudo/summary.json`).
        self.summary: dict[str, dict[str, Any]] = {}
        self.files = PseudoFiles(config.training.output_dir, getattr(self.args, self.samples_dir_key, None))
        self._base: tuple[torch.nn.Module, Any] | None = None
        self.is_main = PartialState().is_main_process

    def encode_task(self, data, builder, cutoff_len):
        super().encode_task(data, builder, cutoff_len)
        self.builder = builder

    # ---- mixing ----------------------------------------------------------------------------------------
    def replayed_rows(self, task: Task) -> list[PseudoRow]:
        """The pseudo-rows trained with `task`: those of every earlier task, in task order."""
        return [row for name, rows in self.memory.items() if name != task.name for row in rows]

    def training_rows(self, task: Task, rows):
        return rows + self.encode_rows(self.replayed_rows(task))

    def encode_rows(self, rows: list[PseudoRow]) -> list[dict[str, list[int]]]:
        """Pseudo-rows encoded like train rows (prompt + answer, answer-only labels); a row whose answer
        `cutoff_len` cuts away entirely is left out, as `retain.data.tasks.encode_task` does."""
        encoded = []
        for row in rows:
            item = self.builder.encode_train(alpaca_to_example(row), self.cutoff_len)
            if any(label != IGNORE_INDEX for label in item["labels"][1:]):
                encoded.append(item)
        return encoded

    def writes_rows_of(self, task: Task) -> bool:
        """Whether rows of `task` are made when it ends: yes, except after the run's last task when
        `generate_for_last_task` is false (only a run continuing from this one would use them)."""
        return task != self.tasks[-1] or self.args.generate_for_last_task

    # ---- generation ------------------------------------------------------------------------------------
    def sample(
        self,
        model: torch.nn.Module,
        tokenizer,
        prompt_ids: list[int],
        count: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        desc: str,
    ) -> tuple[list[str], list[bool]]:
        """`count` sampled completions of one prompt, and whether each ended by itself (not at the limit)."""
        sampling = Sampling(temperature=temperature, top_p=TOP_P, top_k=TOP_K, seed=seed)
        return generate_answers(
            model,
            tokenizer,
            [list(prompt_ids)] * count,
            self.config.training.per_device_eval_batch_size,
            max_new_tokens,
            desc=desc,
            sampling=sampling,
            return_finished=True,
        )

    def reuse_or_generate(
        self,
        name: str,
        fingerprint: str,
        generate: Callable[[], tuple[list[dict[str, str]], dict[str, dict[str, int]]]],
    ) -> list[dict[str, str]]:
        """The rows of `pseudo/<name>.json`: reused when its fingerprint matches, else generated (every
        process) and written (main process) with their counts and generation time."""
        found = self.files.load_if_current(name, fingerprint)
        PartialState().wait_for_everyone()  # every process decides before the main one writes
        if found is not None:
            rows, entry = found
            if self.is_main:
                logger.info("%s: reusing %s (%d rows)", self.name, self.files.path(name), len(rows))
        else:
            start = time.perf_counter()
            rows, counts = generate()
            entry = {
                "rows_of": counts,
                "seconds": round(time.perf_counter() - start, 3),
                "fingerprint": fingerprint,
            }
            if self.is_main:
                self.files.write(name, rows, entry)
                logger.warning("note: %s", counts_note(self.name, name, entry))
        self.summary[name] = entry
        return rows

    def report_info(self) -> dict[str, Any]:
        """Per pseudo file: the generated rows kept, dropped as malformed or duplicates, and the seconds spent
        (the report shows them; malformed generations are never trained on)."""
        return {
            "pseudo_rows": {
                name: {**entry["rows_of"], "seconds": entry["seconds"]}
                for name, entry in self.summary.items()
            }
        }

    def fingerprint(self, model: torch.nn.Module, name: str, **extra: Any) -> str:
        """What decides a generation: the method's settings, the seed, the model, the prompt format, the
        generation's own inputs (`extra`) and the adapter's weights."""
        settings = {
            k: v
            for k, v in dataclasses.asdict(self.args).items()
            if not k.endswith("_samples_dir") and k != "generate_for_last_task"
        }
        head = {
            "method": self.name,
            "name": name,
            "args": settings,
            "seed": self.config.training.seed,
            "model": self.config.model.model_name_or_path,
            "template": self.config.data.template,
            "cutoff_len": self.cutoff_len,
            "max_new_tokens": self.config.generating.max_new_tokens,
            **extra,
        }
        digest = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode("utf-8"))
        for key, param in sorted(adapter_parameters(model, self.adapter_name).items()):
            digest.update(key.encode("utf-8"))
            digest.update(param.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @contextlib.contextmanager
    def base_model(self, model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, Any]]:
        """The model that writes new rows from a few-shot prompt, with its tokenizer: the run's model with its
        adapters disabled, or the model at `base_model_path` when that names another one (loaded once)."""
        path = getattr(self.args, "base_model_path", None)
        if not path or path == self.config.model.model_name_or_path:
            with model.disable_adapter():
                yield model, self.tokenizer
            return
        if self._base is None:
            from retain.model.loader import load_model

            base, tokenizer = load_model(dataclasses.replace(self.config.model, model_name_or_path=path))
            base.requires_grad_(False)
            if not (self.config.model.device_map or self.config.model.quantization_bit):
                base.to(next(model.parameters()).device)
            self._base = (base.eval(), tokenizer)
        yield self._base

    def draw_shots(self, task: Task, data, count: int) -> list[PseudoRow]:
        """`count` of the task's real train rows for the few-shot prompt, drawn without replacement by a
        generator seeded with (seed, method, task): the same on every process and in every run."""
        rng = random.Random(f"{self.config.training.seed}:{self.name}:shots:{task.name}")
        indices = rng.sample(range(len(data.train)), min(count, len(data.train)))
        return [example_to_alpaca(data.train[i]) for i in indices]

    def few_shot_candidates(
        self, model, task: Task, data, count: int, num_shots: int, temperature: float, need_output: bool
    ) -> list[PseudoRow | None]:
        """`count` new rows the base model writes after a few-shot prompt of the task's rows (None: malformed),
        each up to twice the tokens of the longest shot block (`few_shot_request`)."""
        shots = self.draw_shots(task, data, num_shots)
        with self.base_model(model) as (base, tokenizer):
            prompt, max_new_tokens = few_shot_request(tokenizer, shots)
            texts, finished = self.sample(
                base,
                tokenizer,
                prompt,
                count,
                max_new_tokens,
                temperature,
                derived_seed(self.config.training.seed, self.name, "candidates", task.name),
                desc=f"{self.name}: write {task.name} rows",
            )
        return [parse_few_shot_completion(t, f, need_output) for t, f in zip(texts, finished, strict=True)]

    # ---- state -----------------------------------------------------------------------------------------
    def rehearsal_state(self) -> dict[str, Any]:
        return {"memory": self.memory, "summary": self.summary}

    def restore_rehearsal_state(self, state: dict[str, Any]) -> None:
        self.memory = {name: list(rows) for name, rows in state.get("memory", {}).items()}
        self.summary = dict(state.get("summary", {}))

    def save_task(self, model, task: Task, directory: Path) -> None:
        super().save_task(model, task, directory)
        save_state(directory, self.name, self.rehearsal_state())

    def load_task(self, model, task: Task | None, directory: Path) -> None:
        super().load_task(model, task, directory)
        self.restore_rehearsal_state(load_state(directory, self.name))


def counts_note(method: str, name: str, entry: dict[str, Any]) -> str:
    """One line for the console: kept and dropped rows per task, and the time taken."""
    parts = []
    for task, counts in entry["rows_of"].items():
        dropped = ", ".join(f"{v} {k}" for k, v in counts.items() if k not in ("generated", "kept") and v)
        parts.append(
            f"{task}: {counts['kept']} of {counts['generated']} kept"
            + (f" ({dropped} dropped)" if dropped else "")
        )
    return f"{method}: pseudo/{name}.json: " + "; ".join(parts) + f" [{entry['seconds']:.1f} s]"
