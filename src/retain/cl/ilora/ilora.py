"""I-LoRA (interpolation-based LoRA): a plastic and a stable adapter, reservoir replay and a
selective hidden-state consistency loss. The formulas and every decision are in README.md.

The math lives in pure functions in `ilora_math.py` (`ema_decay`, `ema_update_`, `selective_mask`,
`consistency_loss`, `resolve_hidden_layers`, `concat_right_padded`) so that tests can check it
against hand-computed values; the `ILORA` class wires them into the engine's hooks.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import load_file, save
from transformers import TrainerCallback

from retain.cl.base import CLMethod, Task
from retain.cl.buffer import ReservoirBuffer
from retain.cl.ilora import SPEC
from retain.cl.ilora.config import ILORAArguments
from retain.cl.ilora.ilora_adapter import (
    PLASTIC,
    STABLE,
    hand_over,
    init_ilora_adapter,
    load_ilora_adapters,
    save_ilora_adapters,
)
from retain.cl.ilora.ilora_math import (
    concat_right_padded,
    consistency_loss,
    ema_decay,
    ema_update_,
    resolve_hidden_layers,
)
from retain.cl.loss import LossScale, causal_lm_loss, shifted_targets, token_ce_sum
from retain.data.prompt import IGNORE_INDEX, pad_batch
from retain.errors import RetainError, TrainingError
from retain.io import atomic_write_bytes
from retain.model.adapters import (
    activate_adapter,
    adapter_parameters,
    paired_parameters,
    save_adapter,
    set_trainable,
    tuner_layers,
    use_adapter,
)

logger = logging.getLogger(__name__)

BUFFER_FILE = "ilora_buffer.safetensors"
#: Mid-task checkpoint files (next to the Trainer's in `checkpoint-N/`).
CHECKPOINT_STATE = "ilora_state.safetensors"  # the EMA adapter and the EMA step counter (main process)
CHECKPOINT_BUFFER = "ilora_buffer_rank{rank}.safetensors"  # each process's own replay buffer


# ---- replay buffer -------------------------------------------------------------------------------------


class Buffer(ReservoirBuffer):
    """The shared reservoir memory (uniform over every row offered) with I-LoRA's `get_data`.

    Rows are stored unpadded (`add_batch` strips a padded batch with its attention mask);
    `get_data` draws distinct rows and right-pads them into a batch.
    """

    def __init__(self, capacity: int, seed: int = 0, pad_id: int = 0):
        super().__init__(capacity, seed=seed)
        self.pad_id = pad_id

    def get_data(self, batch_size: int) -> dict[str, torch.Tensor] | None:
        """A right-padded batch (input_ids, labels, attention_mask) of up to `batch_size` rows; None if empty."""
        rows = self.sample(batch_size)
        return pad_batch(rows, self.pad_id, side="right") if rows else None

    def load(self, path: str | Path) -> None:
        """Load a saved buffer, keeping this buffer's configured capacity.

        A saved buffer holding more rows than the capacity is cut down to a uniform subsample (still a
        uniform sample of everything seen).
        """
        capacity = self.capacity
        super().load(path)
        self.capacity = capacity
        if len(self.rows) > capacity:
            self.rows = self.rng.sample(self.rows, capacity)


# ---- the method ----------------------------------------------------------------------------------------


@dataclass
class _ReplayChunk:
    """The buffer rows replayed with one micro-batch, and the step-wide normalisers."""

    batch: dict[str, torch.Tensor] | None  # right-padded, on the CPU; None: no rows for this micro-batch
    step_has_replay: bool  # whether the optimizer step replays anything at all
    step_label_tokens: int  # label tokens of every replayed row of the step
    step_real_tokens: int  # real (non-padding) tokens of every replayed row of the step


def _label_tokens(row: dict[str, list[int]]) -> int:
    """Tokens a row contributes to the shifted cross-entropy (labels after the first position)."""
    return sum(1 for v in row["labels"][1:] if v != IGNORE_INDEX)


class ILORACallback(TrainerCallback):
    """After every optimizer step: store the step's samples in the buffer, then update the EMA adapter."""

    def __init__(self, method: ILORA):
        self.method = method

    def on_step_end(self, args, state, control, **kwargs):
        self.method.end_step()


class ILORA(CLMethod):
    """I-LoRA: `default` learns, `ema` follows it by EMA and answers at evaluation."""

    spec = SPEC
    sharding_limit = (
        "its EMA update and checkpoints read the whole weights of the `default` and `ema` adapters"
    )
    task_dir_pattern = "ilora_task{id}"

    def __init__(self, config):
        super().__init__(config)
        args: ILORAArguments = self.args
        state = PartialState()
        if args.ema_adapter_path and not config.cl.previous_task_model and state.is_main_process:
            # EasyCL's example configs carry it for the first task too; it only replaces previous_task_model/ema.
            logger.warning(
                "note: 'ema_adapter_path' is not used: there is no previous_task_model to continue from"
            )
        # Two backward passes per micro-batch: not under DeepSpeed, whose engine counts one per micro-batch.
        self.split = args.ilora_pass == "split" and not config.training.deepspeed
        if args.ilora_pass == "split" and not self.split and state.is_main_process:
            logger.warning("note: 'ilora_pass': split is not used under DeepSpeed; the joined pass trains")
        # Each process keeps its own buffer (it sees its own shard of the data).
        rank = state.process_index
        self.buffer = Buffer(args.ilora_buffer_size, seed=config.training.seed + rank)
        self.replay_batch_size = args.ilora_replay_batch_size or config.training.per_device_train_batch_size
        self.model: Any = None
        self.layer_indices: list[int] = []
        self.ema_updates = 0  # EMA updates made in the current task (t of the next update)
        self._plan: deque[_ReplayChunk] = deque()
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_event: Any = None

    # ---- model -----------------------------------------------------------------------------------
    def prepare_model(self, model, tokenizer):
        self.tokenizer = tokenizer
        self.buffer.pad_id = tokenizer.pad_token_id
        peft_model = init_ilora_adapter(model, self.config.finetuning)
        self.bind(peft_model)
        return peft_model

    def bind(self, peft_model) -> None:
        """Select, once, everything the step needs: adapter tensors, tuner layers, the body, the layers."""
        self.model = peft_model
        self._layers = tuner_layers(peft_model)
        self._default_tensors, self._ema_tensors = paired_parameters(peft_model, PLASTIC, STABLE)
        base = peft_model.get_base_model()
        self._body = base.base_model  # the transformer body without the LM head (e.g. LlamaModel)
        if self._body is base:
            raise RetainError(f"I-LoRA cannot find the transformer body of {type(base).__name__}")
        self._body_modules = list(self._body.modules())
        self.layer_indices = resolve_hidden_layers(
            self.args.hidden_state_layers, base.config.get_text_config().num_hidden_layers
        )

    def callbacks(self, model):
        return [ILORACallback(self)]

    # ---- task boundaries -------------------------------------------------------------------------
    def begin_task(self, model, task: Task, data) -> None:
        # default <- ema: the previous task's stable adapter (for the first task, ema is a copy of the
        # fresh default, so this changes nothing). ema stays as it is, so both start equal.
        hand_over(self.model)
        activate_adapter(self.model, PLASTIC, self._layers)
        self.ema_updates = 0
        self._plan.clear()
        self._pending = []

    def end_task(self, model, task: Task, data) -> None:
        self._plan.clear()
        self._pending = []

    def save_task(self, model, task: Task, directory: Path) -> None:
        save_ilora_adapters(model, directory, save_ema=self.args.save_ema_adapter)
        self.buffer.save(directory / BUFFER_FILE)

    def load_task(self, model, task: Task | None, directory: Path) -> None:
        """Restore the state saved after a task: both adapters and the buffer.

        `task` None is the hand-over from `previous_task_model`, where `ema_adapter_path` (if set)
        replaces `directory/ema`. The switch `default <- ema` happens in `begin_task`.
        """
        ema_path = self.args.ema_adapter_path if task is None and self.config.cl.previous_task_model else None
        load_ilora_adapters(model, directory, ema_path)
        path = Path(directory) / BUFFER_FILE
        if not path.is_file():
            raise RetainError(
                "I-LoRA replay buffer not found (not an I-LoRA task directory?)", source=str(path)
            )
        self.buffer.load(path)
        set_trainable(model, {PLASTIC})
        activate_adapter(model, PLASTIC, self._layers)

    # ---- mid-task checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, model, directory: Path) -> None:
        """The Trainer's checkpoint holds `default` (and its optimizer); add what it does not: the `ema`
        adapter with the EMA step counter (main process) and each process's replay buffer.

        The Trainer calls this after the step's callbacks, so the step's rows are already in the buffer
        and the EMA update is done; nothing is pending.
        """
        directory = Path(directory)
        state = PartialState()
        if state.is_main_process:
            tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_parameters(model, STABLE).items()}
            meta = {"format": "1", "ema_updates": str(self.ema_updates)}
            atomic_write_bytes(directory / CHECKPOINT_STATE, save(tensors, metadata=meta))
        self.buffer.save(directory / CHECKPOINT_BUFFER.format(rank=state.process_index))

    def load_checkpoint(self, model, directory: Path) -> None:
        """Restore the `ema` adapter, the EMA step counter and this process's buffer (after `begin_task`)."""
        directory = Path(directory)
        state = PartialState()
        path = directory / CHECKPOINT_STATE
        buffer_path = directory / CHECKPOINT_BUFFER.format(rank=state.process_index)
        for needed in (path, buffer_path):
            if not needed.is_file():
                raise RetainError(
                    "this checkpoint has no I-LoRA state for this process (written by another method, or "
                    "by a run with another number of processes); resume with the same setup, or delete "
                    "the checkpoint folder to restart the task",
                    source=str(needed),
                )
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if not meta.get("ema_updates", "").isdigit():
            raise RetainError("the I-LoRA checkpoint state has no EMA step counter", source=str(path))
        saved = load_file(str(path))
        targets = adapter_parameters(model, STABLE)
        if saved.keys() != targets.keys():
            raise RetainError(
                "the saved EMA adapter does not match the model's `ema` adapter", source=str(path)
            )
        with torch.no_grad():
            for key, param in targets.items():
                param.copy_(saved[key].to(param.device, param.dtype))
        self.ema_updates = int(meta["ema_updates"])
        self.buffer.load(buffer_path)
        set_trainable(model, {PLASTIC})
        activate_adapter(model, PLASTIC, self._layers)

    @contextlib.contextmanager
    def evaluation(self, model, trained: Task | None, evaluated: Task) -> Iterator[None]:
        if trained is None:
            with model.disable_adapter():
                yield
        else:
            with use_adapter(model, self.args.ilora_eval_adapter, self._layers):
                yield

    def export(self, model, directory: Path) -> list[Path]:
        """The adapter that answers at evaluation (`ilora_eval_adapter`, the EMA one by default)."""
        save_adapter(model, self.args.ilora_eval_adapter, directory)
        return [directory]

    def base_evaluation_key(self) -> str | None:
        return "generative"  # the base row is the plain model, adapters off, with greedy generation

    # ---- the seed's API ----------------------------------------------------------------------------
    def update_ema_weights(self) -> float:
        """One EMA step over every tensor of the adapter pair; returns the decay `a_t` used."""
        decay = ema_decay(self.ema_updates, self.args.ema_alpha)
        ema_update_(self._ema_tensors, self._default_tensors, decay)
        self.ema_updates += 1
        return decay

    def compute_consistency_loss(
        self,
        plastic_hidden: Sequence[torch.Tensor],
        stable_hidden: Sequence[torch.Tensor],
        attention_mask: torch.Tensor,
        num_tokens: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        return consistency_loss(
            plastic_hidden,
            stable_hidden,
            attention_mask,
            selective=self.args.selective_update,
            threshold=self.args.min_update_threshold,
            num_tokens=num_tokens,
        )

    def store_sample(self, batch: dict[str, torch.Tensor]) -> None:
        """Offer every row of a padded batch to the reservoir buffer (stored without padding)."""
        self.buffer.add_batch(batch)

    def get_replay_samples(self, batch_size: int) -> dict[str, torch.Tensor] | None:
        return self.buffer.get_data(batch_size)

    # ---- the training step -------------------------------------------------------------------------
    def begin_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Draw the replay rows of the whole optimizer step at once and split them by micro-batch.

        Drawing per step (not per micro-batch) and normalising by the step's token counts makes the
        loss identical under gradient accumulation 1 and n.
        """
        count = len(micro_batches)
        size = self.replay_batch_size
        rows = self.buffer.sample(size * count)
        label_tokens = sum(_label_tokens(r) for r in rows)
        real_tokens = sum(len(r["input_ids"]) for r in rows)
        self._plan = deque()
        for i in range(count):
            part = rows[i * size : (i + 1) * size]
            self._plan.append(
                _ReplayChunk(
                    batch=pad_batch(part, self.buffer.pad_id, side="right") if part else None,
                    step_has_replay=bool(rows),
                    step_label_tokens=max(label_tokens, 1),
                    step_real_tokens=max(real_tokens, 1),
                )
            )
        self._stash(micro_batches)

    def _stash(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Start copying the step's rows to the CPU (asynchronously on a GPU); stored in `end_step`."""
        self._pending = []
        self._pending_event = None
        if self.buffer.capacity == 0:
            return
        keys = ("input_ids", "labels", "attention_mask")
        on_gpu = any(batch["input_ids"].is_cuda for batch in micro_batches)
        for batch in micro_batches:
            # On CUDA the copy is asynchronous (into pinned memory); an event marks its end.
            self._pending.append(
                {k: batch[k].detach().to("cpu", non_blocking=on_gpu) for k in keys if k in batch}
            )
        if on_gpu:
            self._pending_event = torch.cuda.Event()
            self._pending_event.record()

    def end_step(self) -> None:
        """After the optimizer step: store the step's samples, then update the EMA adapter."""
        if self._pending_event is not None:
            self._pending_event.synchronize()  # waits for the row copies only, long done by now
            self._pending_event = None
        for batch in self._pending:
            self.store_sample(batch)
        self._pending = []
        self.update_ema_weights()

    def compute_loss(self, model, inputs, scale: LossScale) -> torch.Tensor:
        """`(L_cur + L_buf)/2 + consistency_weight * l_cons` when the step replays rows, else `L_cur`."""
        return sum(part() for part in self.loss_parts(model, inputs, scale))

    def loss_parts(self, model, inputs, scale: LossScale) -> list:
        """One part (`joined`: current and replayed rows in one pass) or two (`split`: `L_cur / 2`, then
        `L_buf / 2 + consistency_weight * l_cons`), which the trainer backpropagates one after the other."""
        if not model.training:
            return [lambda: causal_lm_loss(model, inputs, scale)]
        if not self._plan:
            raise TrainingError(
                "I-LoRA's compute_loss ran without a planned replay batch: the trainer must call "
                "method.begin_step (retain.training.trainer.CLTrainer does)"
            )
        chunk = self._plan.popleft()
        if not chunk.step_has_replay:
            return [lambda: causal_lm_loss(model, inputs, scale)]
        if chunk.batch is None:  # the buffer had too few rows to give this micro-batch any
            return [lambda: 0.5 * causal_lm_loss(model, inputs, scale)]
        device = inputs["input_ids"].device
        replay = {k: v.to(device, non_blocking=True) for k, v in chunk.batch.items()}
        if self.split:
            return [
                lambda: 0.5 * causal_lm_loss(model, inputs, scale),
                lambda: self._replay_loss(model, replay, chunk),
            ]
        return [lambda: self._joined_loss(model, inputs, replay, chunk, scale)]

    def _joined_loss(self, model, inputs, replay, chunk: _ReplayChunk, scale: LossScale) -> torch.Tensor:
        joined = concat_right_padded(inputs, replay, self.buffer.pad_id)
        keep, targets = shifted_targets(joined["labels"])
        out = self._plastic_pass(model, joined, keep)
        n_cur = inputs["input_ids"].size(0)
        cur_sum, cur_count = token_ce_sum(out.logits[:n_cur], targets[:n_cur])
        buf_sum, _ = token_ce_sum(out.logits[n_cur:], targets[n_cur:])
        width = replay["input_ids"].size(1)
        plastic = (
            [out.hidden_states[i][n_cur:, :width] for i in self.layer_indices] if self._use_cons else None
        )
        return 0.5 * scale.token_mean(cur_sum, cur_count) + self._replay_terms(
            buf_sum, plastic, replay, chunk
        )

    def _replay_loss(self, model, replay, chunk: _ReplayChunk) -> torch.Tensor:
        keep, targets = shifted_targets(replay["labels"])
        out = self._plastic_pass(model, replay, keep)
        buf_sum, _ = token_ce_sum(out.logits, targets)
        plastic = [out.hidden_states[i] for i in self.layer_indices] if self._use_cons else None
        return self._replay_terms(buf_sum, plastic, replay, chunk)

    def _plastic_pass(self, model, batch, keep):
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=keep,
            output_hidden_states=self.layer_indices if self._use_cons else None,
            use_cache=False,
        )

    def _replay_terms(self, buf_sum, plastic, replay, chunk: _ReplayChunk) -> torch.Tensor:
        """`L_buf / 2 + consistency_weight * l_cons`; L_buf is the mean over the step's replayed label
        tokens (per process; DDP then averages the processes)."""
        l_buf = LossScale(num_items=chunk.step_label_tokens).token_mean(buf_sum, chunk.step_label_tokens)
        loss = 0.5 * l_buf
        if plastic is not None:
            stable = self.stable_hidden_states(replay)
            l_cons = self.compute_consistency_loss(
                plastic, stable, replay["attention_mask"], num_tokens=chunk.step_real_tokens
            )
            loss = loss + self.args.consistency_weight * l_cons
        return loss

    @property
    def _use_cons(self) -> bool:
        return self.args.consistency_weight > 0

    @torch.no_grad()
    def stable_hidden_states(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The `ema` adapter's hidden states at the selected layers: one no-grad pass through the body
        (no LM head), in eval mode so that the target is deterministic."""
        modes = [m.training for m in self._body_modules]
        _set_training(self._body_modules, [False] * len(modes))
        try:
            with use_adapter(self.model, STABLE, self._layers):
                out = self._body(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=self.layer_indices,
                    use_cache=False,
                )
        finally:
            _set_training(self._body_modules, modes)
        return [out.hidden_states[i] for i in self.layer_indices]


def _set_training(modules: list[torch.nn.Module], modes: list[bool]) -> None:
    """`module.train(mode)` for a precomputed module list, without the recursive walk."""
    for module, mode in zip(modules, modes, strict=True):
        module.__dict__["training"] = mode
