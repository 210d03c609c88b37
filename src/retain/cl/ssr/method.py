"""ssr: Self-Synthesized Rehearsal. `seq` plus rows made for each finished task and rehearsed later.

When task t ends (`end_task`, every process, after its last optimizer step):
1. inputs: `num_shots` real train rows of t (a seeded draw) go into a few-shot prompt and the base
   model (`base_model_path`; by default the run's model with its adapters disabled) samples
   `ssr_num_candidates` new blocks at `generation_temperature`; each block's instruction and input
   are kept (its output is not used); malformed and repeated inputs are dropped and counted;
2. refinement: the latest fine-tuned model (the adapter after t) answers each input greedily, as in
   evaluation; rows with an empty answer are dropped and counted;
3. selection: K-means with `n_clusters` over each row's mean last-layer hidden state (the latest
   model, prompt and answer tokens) picks up to `pseudo_sample_memory` rows, nearest to the
   centroids first (`retain.cl.ssr.selection`).
The rows are kept (`memory`, saved with the task), written to `pseudo/<t>.json`, and rehearsed with
every later task (concatenated with its rows; the Trainer shuffles). No real row is kept.
With `generate_for_last_task: false` nothing is made when the run's last task ends.
"""

from __future__ import annotations

import numpy as np
import torch

from retain.cl.base import Task
from retain.cl.rehearsal.base import GenerativeRehearsal
from retain.cl.rehearsal.rows import PseudoRow, alpaca_to_example, derived_seed, keep_well_formed
from retain.cl.ssr import SPEC
from retain.cl.ssr.config import SSRArguments
from retain.cl.ssr.selection import cluster_select
from retain.data.prompt import pad_batch
from retain.eval.predict import generate_answers


class SSR(GenerativeRehearsal):
    spec = SPEC

    def __init__(self, config):
        super().__init__(config)
        self.args: SSRArguments

    def end_task(self, model, task: Task, data) -> None:
        args = self.args
        if args.pseudo_sample_memory == 0 or args.ssr_num_candidates == 0 or not self.writes_rows_of(task):
            self.memory[task.name] = []
            return

        def generate():
            candidates = self.few_shot_candidates(
                model, task, data, args.ssr_num_candidates, args.num_shots, args.generation_temperature, False
            )
            inputs, counts = keep_well_formed(candidates, lambda row: (row["instruction"], row["input"]))
            answered = [row for row in self.refine(model, task, data, inputs) if row["output"]]
            chosen = self.select(model, task, answered)
            counts.update(
                unanswered=len(inputs) - len(answered),
                not_selected=len(answered) - len(chosen),
                kept=len(chosen),
            )
            return chosen, {task.name: counts}

        self.memory[task.name] = self.reuse_or_generate(
            task.name, self.fingerprint(model, task.name), generate
        )

    def refine(self, model, task: Task, data, rows: list[PseudoRow]) -> list[PseudoRow]:
        """Each input answered by the latest model, greedily, with evaluation's token limit."""
        if not rows:
            return []
        prompts = [self.builder.prompt_ids(alpaca_to_example({**row, "output": ""})) for row in rows]
        limit = self.config.generating.max_new_tokens or (
            max(len(self.builder.answer_ids(e.answer)) for e in data.train) + 1
        )
        answers = generate_answers(
            model,
            self.tokenizer,
            prompts,
            self.config.training.per_device_eval_batch_size,
            limit,
            desc=f"ssr: answer {task.name} rows",
        )
        return [{**row, "output": answer.strip()} for row, answer in zip(rows, answers, strict=True)]

    def select(self, model, task: Task, rows: list[PseudoRow]) -> list[PseudoRow]:
        if not rows:
            return []
        seed = derived_seed(self.config.training.seed, self.name, "kmeans", task.name)
        indices = cluster_select(
            self.features(model, rows), self.args.n_clusters, self.args.pseudo_sample_memory, seed
        )
        return [rows[i] for i in indices]

    @torch.no_grad()
    def features(self, model, rows: list[PseudoRow]) -> np.ndarray:
        """Per row, the mean over its tokens (prompt and answer, as trained) of the last layer's hidden
        states, in eval mode (float64, rows x hidden size)."""
        encoded = [self.builder.encode_train(alpaca_to_example(row), self.cutoff_len) for row in rows]
        device = next(model.parameters()).device
        size = self.config.training.per_device_eval_batch_size
        was_training = model.training
        model.eval()
        means = []
        for start in range(0, len(encoded), size):
            batch = pad_batch(
                encoded[start : start + size], self.tokenizer.pad_token_id, "right", ("input_ids",)
            )
            mask = batch["attention_mask"].to(device)
            out = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=mask,
                output_hidden_states=True,
                logits_to_keep=1,
            )
            weights = mask.unsqueeze(-1).to(out.hidden_states[-1].dtype)
            means.append(((out.hidden_states[-1] * weights).sum(1) / weights.sum(1)).float().cpu())
        if was_training:
            model.train()
        return torch.cat(means).double().numpy()
