"""LAMOL: the model learns each task's rows as a language model too, and writes rows of earlier tasks.

Every train row (question q = the user turn, answer a) trains twice in one forward pass:
- question answering, as in `seq`: the chat prompt of q, loss on the answer tokens (L_qa);
- generation: the plain text `__gen_<task>__` + `q __ans__ a` + EOS, loss on every token after the
  task's marker (L_gen).
The loss of a step is `L_qa + lamol_gamma * L_gen`, both token means over the step
(`retain.cl.loss.LossScale`; the generation tokens of the step are counted in `begin_step`).

Before task t (`begin_task`, every process), the model as it stands after task t-1 samples
`lamol_num_samples_per_task` (or `lamol_sample_ratio`'s share) completions of each earlier task's marker at
`lamol_generation_temperature`; a completion that ends by itself (EOS) and reads `q __ans__ a` with
both parts non-empty becomes a pseudo-row, malformed and repeated ones are dropped and counted. The
pseudo-rows train with task t on both losses (each with its own task's marker), are written to
`pseudo/<t>.json` and reused by a resumed run. No real row is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import reduce

from retain.cl.base import Task
from retain.cl.lamol import SPEC
from retain.cl.lamol.config import LamolArguments
from retain.cl.loss import LossScale, causal_lm_loss, shifted_targets, token_ce_sum
from retain.cl.rehearsal.base import GenerativeRehearsal
from retain.cl.rehearsal.rows import (
    PseudoRow,
    alpaca_identity,
    alpaca_to_example,
    derived_seed,
    keep_well_formed,
    question_of,
    question_to_alpaca,
)
from retain.data.prompt import IGNORE_INDEX, pad_batch
from retain.errors import TrainingError

ANSWER_MARKER = " __ans__ "
#: Before the instruction of a written row's question-answering prompt, with `lamol_show_gen`.
SHOW_GEN_PREFIX = "(generated) "

# ---- the generation format (pure) ----------------------------------------------------------------------


def generation_marker(task: str) -> str:
    """The plain-text marker after which the model writes a row of `task` (LAMOL's task-specific token)."""
    return f"__gen_{task}__"


def generation_body(question: str, answer: str) -> str:
    return f"{question}{ANSWER_MARKER}{answer}"


def parse_generation(text: str, finished: bool) -> tuple[str, str] | None:
    """(question, answer) of a written row, or None (malformed): it must have ended by itself (EOS, not
    the token limit), hold `__ans__` exactly once and no task marker, with both parts non-empty."""
    if not finished or "__gen_" in text:
        return None
    parts = text.split(ANSWER_MARKER.strip())
    if len(parts) != 2:
        return None
    question, answer = parts[0].strip(), parts[1].strip()
    return (question, answer) if question and answer else None


def generation_row(marker: list[int], body: list[int], eos_id: int, cutoff_len: int) -> dict[str, list[int]]:
    """The generation row: marker + body + EOS, labels on the body and EOS, cut to `cutoff_len`."""
    ids = marker + body + [eos_id]
    labels = [IGNORE_INDEX] * len(marker) + body + [eos_id]
    return {"gen_input_ids": ids[:cutoff_len], "gen_labels": labels[:cutoff_len]}


def has_answer(row: dict[str, list[int]]) -> bool:
    return any(label != IGNORE_INDEX for label in row["labels"][1:])


def stack_right_padded(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], pad_id: int
) -> dict[str, torch.Tensor]:
    """Two right-padded batches (input_ids, labels, attention_mask) as one, the narrower one padded."""
    width = max(first["input_ids"].size(1), second["input_ids"].size(1))
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    padded = [
        {k: F.pad(batch[k], (0, width - batch[k].size(1)), value=v) for k, v in fills.items()}
        for batch in (first, second)
    ]
    return {k: torch.cat([padded[0][k], padded[1][k]]) for k in fills}


def generation_part(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: inputs[f"gen_{k}"] for k in ("input_ids", "labels", "attention_mask")}


class LamolCollator:
    """Right-pads the question-answering rows (`input_ids`, `labels`) and, when present, the generation
    rows (`gen_input_ids`, `gen_labels`, `gen_attention_mask`) separately."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        batch = pad_batch(rows, self.pad_id, side="right")
        if "gen_input_ids" in rows[0]:
            gen = [{"input_ids": r["gen_input_ids"], "labels": r["gen_labels"]} for r in rows]
            batch.update({f"gen_{k}": v for k, v in pad_batch(gen, self.pad_id, side="right").items()})
        return batch


# ---- the method ----------------------------------------------------------------------------------------


class LAMOL(GenerativeRehearsal):
    spec = SPEC
    samples_dir_key = "lamol_samples_dir"

    def __init__(self, config):
        super().__init__(config)
        self.args: LamolArguments
        #: Tasks learned so far, in order, with the token limit of their written rows.
        self.learned: dict[str, int] = {}
        #: Token limits of this run's tasks: the longest generation row (body + EOS) plus a quarter.
        self.limits: dict[str, int] = {}
        #: The pseudo-rows (alpaca + "task") that train with the current task.
        self.current: list[PseudoRow] = []
        self.step_gen_tokens: torch.Tensor | None = None

    @property
    def trains_generation(self) -> bool:
        return self.args.lamol_gamma > 0

    # ---- rows ------------------------------------------------------------------------------------------
    def marker_ids(self, task: str) -> list[int]:
        return self.builder.tokenizer(generation_marker(task))["input_ids"]

    def body_ids(self, question: str, answer: str) -> list[int]:
        return self.builder.tokenizer(generation_body(question, answer), add_special_tokens=False)[
            "input_ids"
        ]

    def gen_row(self, task: str, question: str, answer: str) -> dict[str, list[int]]:
        tokenizer = self.builder.tokenizer
        return generation_row(
            self.marker_ids(task), self.body_ids(question, answer), tokenizer.eos_token_id, self.cutoff_len
        )

    def encode_task(self, data, builder, cutoff_len):
        super().encode_task(data, builder, cutoff_len)
        kept = [e for e in data.train if has_answer(builder.encode_train(e, cutoff_len))]
        assert len(kept) == len(data.train_rows)
        longest = max(len(self.body_ids(question_of(e), e.answer)) + 1 for e in kept)
        self.limits[data.name] = longest + longest // 4
        if self.trains_generation:
            for row, example in zip(data.train_rows, kept, strict=True):
                row.update(self.gen_row(data.name, question_of(example), example.answer))

    def training_rows(self, task: Task, rows):
        return rows + self.encode_pseudo(self.current)

    def encode_pseudo(self, rows: list[PseudoRow]) -> list[dict[str, list[int]]]:
        """Written rows as train rows: the question-answering row (with `lamol_show_gen`'s prefix) and, when
        the model learns to write, the generation row of the row's own task."""
        prefix = SHOW_GEN_PREFIX if self.args.lamol_show_gen else ""
        encoded = []
        for row in rows:
            item = self.builder.encode_train(alpaca_to_example(row, prefix), self.cutoff_len)
            if not has_answer(item):
                continue
            if self.trains_generation:
                item.update(self.gen_row(row["task"], question_of(alpaca_to_example(row)), row["output"]))
            encoded.append(item)
        return encoded

    def collator(self, tokenizer):
        return LamolCollator(tokenizer.pad_token_id)

    # ---- task boundaries -------------------------------------------------------------------------------
    def begin_task(self, model, task: Task, data) -> None:
        """Write rows of every earlier task with the model as it is now (after the previous task)."""
        self.current = []
        earlier = {name: limit for name, limit in self.learned.items() if name != task.name}
        if not earlier:
            return
        count = self.args.rows_per_earlier_task(len(data.train), len(earlier))
        if count == 0:
            return
        seed = self.config.training.seed

        def generate():
            rows, counts = [], {}
            for name, limit in earlier.items():
                texts, finished = self.sample(
                    model,
                    self.tokenizer,
                    self.marker_ids(name),
                    count,
                    limit,
                    self.args.lamol_generation_temperature,
                    derived_seed(seed, self.name, task.name, name),
                    desc=f"lamol: write {name} rows",
                )
                parsed = [parse_generation(t, f) for t, f in zip(texts, finished, strict=True)]
                kept, counts[name] = keep_well_formed(
                    [None if p is None else question_to_alpaca(*p) for p in parsed], alpaca_identity
                )
                rows += [{**row, "task": name} for row in kept]
            return rows, counts

        fingerprint = self.fingerprint(model, task.name, earlier=earlier, count=count)
        self.current = self.reuse_or_generate(task.name, fingerprint, generate)

    def end_task(self, model, task: Task, data) -> None:
        self.learned[task.name] = self.limits[task.name]

    def rehearsal_state(self):
        return {**super().rehearsal_state(), "learned": self.learned, "trained_with": self.current}

    def restore_rehearsal_state(self, state):
        super().restore_rehearsal_state(state)
        self.learned = {name: int(limit) for name, limit in state["learned"].items()}

    # ---- the training step -----------------------------------------------------------------------------
    def begin_step(self, micro_batches) -> None:
        """Count the generation tokens of the step (every micro-batch; every process when the Trainer
        averages tokens across them): L_gen is their mean, as L_qa is the answer tokens' mean."""
        if not self.trains_generation:
            return
        state = PartialState()
        count = sum(int((b["gen_labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        total = torch.tensor(count, device=state.device)
        if self.config.training.average_tokens_across_devices and state.num_processes > 1:
            total = reduce(total, reduction="sum")
        self.step_gen_tokens = total

    def compute_loss(self, model, inputs, scale: LossScale) -> torch.Tensor:
        """`L_qa + lamol_gamma * L_gen` over one forward pass of the question-answering and generation rows."""
        if not self.trains_generation or not model.training:
            loss = causal_lm_loss(model, inputs, scale)
            if model.training:
                self.loss_terms.add(loss_qa=loss, loss_gen=loss.new_zeros(()))
            return loss
        qa = {k: inputs[k] for k in ("input_ids", "labels", "attention_mask")}
        joined = stack_right_padded(qa, generation_part(inputs), self.tokenizer.pad_token_id)
        keep, targets = shifted_targets(joined["labels"])
        out = model(
            input_ids=joined["input_ids"], attention_mask=joined["attention_mask"], logits_to_keep=keep
        )
        rows = qa["input_ids"].size(0)
        qa_sum, qa_count = token_ce_sum(out.logits[:rows], targets[:rows])
        gen_sum, gen_count = token_ce_sum(out.logits[rows:], targets[rows:])
        loss_qa = scale.token_mean(qa_sum, qa_count)
        loss_gen = self.args.lamol_gamma * self.gen_scale(scale).token_mean(gen_sum, gen_count)
        self.loss_terms.add(loss_qa=loss_qa, loss_gen=loss_gen)
        return loss_qa + loss_gen

    def gen_scale(self, scale: LossScale) -> LossScale:
        """`scale` with the step's generation tokens in place of its answer tokens."""
        if self.step_gen_tokens is None:
            raise TrainingError(
                "LAMOL's compute_loss ran before begin_step counted the step's generation tokens: the trainer "
                "must call method.begin_step (retain.training.trainer.CLTrainer does)"
            )
        items = None if scale.num_items is None else self.step_gen_tokens.clamp(min=1)
        return LossScale(
            num_items=items, accumulation_steps=scale.accumulation_steps, num_processes=scale.num_processes
        )
