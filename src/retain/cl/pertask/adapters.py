"""Per-task adapters of `peft`: creation with their seeds, prompt-tuning init, which parameters train,
switching without `requires_grad` flips, and saving and loading adapters, heads and the router.

Adapter `task-{t}` belongs to task t. The helpers that switch adapters (`task_adapter`,
`adapters_off`) never touch a `requires_grad` flag: they run inside the model's forward, where
flipping flags would disturb autograd and data-parallel wrappers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from retain.cl.pertask.config import PEFTArguments
from retain.cl.pertask.heads import make_head
from retain.cl.pertask.labels import LabelSpace
from retain.cl.pertask.router import TaskRouter
from retain.errors import ConfigError, ModelError
from retain.hparams.args import FinetuningArguments
from retain.model.adapters import (
    ADAPTER_WEIGHTS,
    adapter_parameters,
    load_adapter_weights,
    lora_config,
    tuner_layers,
    use_adapter,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from retain.cl.pertask.model import PerTaskModel

HEAD_FILE = "head.safetensors"
HEAD_CONFIG = "head.json"
ROUTER_FILE = "router.safetensors"
# Offsets that make the seeded initialisations of different parts independent.
ADAPTER_SALT, HEAD_SALT, ROUTER_SALT, FRESH_SALT = 11, 23, 37, 41


def adapter_name(index: int) -> str:
    return f"task-{index}"


def adapter_index(name: str) -> int:
    return int(name.split("-")[1])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run an initialisation with its own seed, leaving the global random state untouched."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def task_adapter(peft: PeftModel, name: str) -> Iterator[None]:
    """Make adapter `name` the active one for the block, then restore the previous one."""
    if name not in peft.peft_config:
        raise ModelError(f"no adapter for task {adapter_index(name) + 1} ({name})")
    if peft.active_adapter == name:
        yield
    elif peft.peft_config[name].is_prompt_learning:
        previous = peft.active_adapter
        peft.active_adapter = name  # the soft prompt is looked up by this name in the forward
        try:
            yield
        finally:
            peft.active_adapter = previous
    else:
        with use_adapter(peft, name):
            yield


@contextlib.contextmanager
def adapters_off(peft: PeftModel) -> Iterator[nn.Module]:
    """Yield the module whose forward is the bare backbone (no LoRA, no soft prompt) in the block."""
    if peft.active_peft_config.is_prompt_learning:
        yield peft.get_base_model()  # the wrapped model never sees the soft prompt
        return
    layers = tuner_layers(peft)
    previous = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True  # what the LoRA layers' forward reads
    try:
        yield peft
    finally:
        for layer, value in zip(layers, previous, strict=True):
            layer._disable_adapters = value


class TaskAdapters:
    """The run's PeftModel with one adapter per task and, with a classifier, the heads and router."""

    def __init__(self, args: PEFTArguments, finetuning: FinetuningArguments, seed: int):
        self.args = args
        self.finetuning = finetuning
        self.run_seed = seed
        self.peft: PeftModel | None = None
        #: the module holding heads and router (None in generative mode)
        self.model: PerTaskModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        #: the task whose adapter and head train (None: everything frozen)
        self.train_index: int | None = None

    @property
    def prompt_tuning(self) -> bool:
        return self.args.PEFT_type == "PromptTuning"

    @property
    def num_virtual(self) -> int:
        return self.args.PEFT_num_virtual_tokens if self.prompt_tuning else 0

    @property
    def hidden_size(self) -> int:
        return self.peft.config.hidden_size

    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    def seed(self, index: int, salt: int) -> int:
        return self.run_seed * 100_003 + index * 1_009 + salt

    # ---- creation ----------------------------------------------------------------------------
    def _config(self):
        args = self.args
        task_type = "FEATURE_EXTRACTION" if args.uses_heads else "CAUSAL_LM"
        if self.prompt_tuning:
            return PromptTuningConfig(
                task_type=task_type,
                num_virtual_tokens=args.PEFT_num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.RANDOM,
            )
        finetuning = dataclasses.replace(
            self.finetuning,
            lora_rank=args.PEFT_lora_r,
            lora_alpha=float(args.PEFT_lora_alpha),
            lora_dropout=args.PEFT_lora_dropout,
        )
        return lora_config(finetuning, task_type=task_type)

    def add(self, index: int, base: nn.Module | None = None, prompt_text: str | None = None) -> None:
        """Create adapter `task-{index}` from its own seed (`base`: wrap this model with it first)."""
        name = adapter_name(index)
        with seeded(self.seed(index, ADAPTER_SALT)):
            try:
                if base is not None:
                    self.peft = get_peft_model(base, self._config(), adapter_name=name)
                else:
                    self.peft.add_adapter(name, self._config())
            except ValueError as exc:
                raise ModelError(f"cannot add adapter {name}: {exc}", field="lora_target") from None
        if self.prompt_tuning and prompt_text is not None:
            self.init_prompt(index, prompt_text)

    def init_prompt(self, index: int, text: str) -> None:
        """Soft prompt = the word embeddings of `text`, repeated or cut to the prompt length."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(
                f"the prompt init text {text!r} has no tokens", field="PEFT_prompt_tuning_init_text"
            )
        count = self.args.PEFT_num_virtual_tokens
        ids = (ids * math.ceil(count / len(ids)))[:count]
        weight = self.peft.prompt_encoder[adapter_name(index)].embedding.weight
        words = self.peft.word_embeddings
        embeddings = words(torch.tensor(ids, device=words.weight.device))
        with torch.no_grad():
            weight.copy_(embeddings.detach().to(weight.device, weight.dtype))

    def new_head(self, out_features: int, seed: int) -> nn.Module:
        with seeded(seed):
            head = make_head(self.args.classifier, self.hidden_size, out_features, self.args.cosine_scale)
        return head.to(self.device())

    def ensure_head(self, index: int, out_features: int) -> None:
        name = adapter_name(index)
        if name not in self.model.heads:
            self.model.heads[name] = self.new_head(out_features, self.seed(index, HEAD_SALT))

    def new_router(self, num_task: int) -> TaskRouter:
        with seeded(self.seed(0, ROUTER_SALT)):
            return TaskRouter(self.hidden_size, num_task)

    # ---- what trains -------------------------------------------------------------------------
    def parameters_of(self, name: str) -> list[nn.Parameter]:
        if self.prompt_tuning:
            return list(self.peft.prompt_encoder[name].parameters())
        return list(adapter_parameters(self.peft, name).values())

    def set_trainable(self, index: int | None) -> None:
        """Exactly task `index`'s adapter and head (and the router) require grad; None freezes everything."""
        self.train_index = index
        active = None if index is None else adapter_name(index)
        for name in self.peft.peft_config:
            for param in self.parameters_of(name):
                param.requires_grad_(name == active)
        if self.model is not None:
            for name, head in self.model.heads.items():
                head.requires_grad_(name == active)
            if self.model.router is not None:
                self.model.router.requires_grad_(index is not None)

    # ---- saving and loading ------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.peft.peft_config, key=adapter_index)

    def save(self, directory: Path, space: LabelSpace | None) -> list[str]:
        """Every adapter in `directory/task-{i}/` (the standard PEFT layout), with its head; the router."""
        names = self.names()
        self.peft.save_pretrained(str(directory), selected_adapters=names)
        if self.model is None:
            return names
        for name in names:
            head = self.model.heads[name]
            save_file(_cpu_state(head), str(directory / name / HEAD_FILE))
            labels = space.head_labels(adapter_index(name))
            spec = {
                "classifier": self.args.classifier,
                "in_features": self.hidden_size,
                "out_features": len(labels),
                "labels": labels,
                "task": space.names[adapter_index(name)],
            }
            (directory / name / HEAD_CONFIG).write_text(json.dumps(spec, indent=1) + "\n")
        if self.model.router is not None:
            save_file(_cpu_state(self.model.router), str(directory / ROUTER_FILE))
        return names

    def load(self, directory: Path, names: list[str], space: LabelSpace | None) -> None:
        """Hold exactly the adapters `names` (and their heads, and the router) saved in `directory`."""
        for name in names:
            if name not in self.peft.peft_config:
                self.add(adapter_index(name))
            self._load_weights(name, directory / name)
        self.peft.set_adapter(names[-1])
        for name in [n for n in self.peft.peft_config if n not in names]:
            self.peft.delete_adapter(name)
        if self.model is not None:
            for name in names:
                self._load_head(name, directory / name, len(space.head_labels(adapter_index(name))))
            for name in [n for n in self.model.heads if n not in names]:
                del self.model.heads[name]
            if self.model.router is not None:
                state = load_file(str(directory / ROUTER_FILE), device=str(self.device()))
                try:
                    self.model.router.load_grown(state)
                except ValueError as exc:
                    raise ModelError(str(exc), source=str(directory / ROUTER_FILE)) from None
        self.set_trainable(None)

    def _load_weights(self, name: str, directory: Path) -> None:
        if not self.prompt_tuning:
            load_adapter_weights(self.peft, name, directory)
            return
        path = directory / ADAPTER_WEIGHTS
        if not path.is_file():
            raise ModelError("adapter weights not found", source=str(path))
        state = load_file(str(path))
        weight = self.peft.prompt_encoder[name].embedding.weight
        if set(state) != {"prompt_embeddings"} or state["prompt_embeddings"].shape != weight.shape:
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            raise ModelError(
                f"expected one soft prompt of shape {tuple(weight.shape)}, found {shapes}", source=str(path)
            )
        with torch.no_grad():
            weight.copy_(state["prompt_embeddings"].to(weight.device, weight.dtype))

    def _load_head(self, name: str, directory: Path, expected: int) -> None:
        spec = json.loads((directory / HEAD_CONFIG).read_text())
        if spec["classifier"] != self.args.classifier or spec["out_features"] != expected:
            raise ModelError(
                f"head {name} is a {spec['classifier']} with {spec['out_features']} classes, expected "
                f"{self.args.classifier} with {expected}",
                source=str(directory),
            )
        head = self.new_head(expected, self.seed(adapter_index(name), HEAD_SALT))
        head.load_state_dict(load_file(str(directory / HEAD_FILE), device=str(self.device())), strict=True)
        self.model.heads[name] = head


def load_exported_head(folder: str | Path) -> tuple[nn.Module, list[str]]:
    """A task's classification head from an exported (or saved) task folder, and its labels in output order.

    `retain export` writes `head.safetensors` and `head.json` next to each task adapter; with the adapter
    on the backbone (`PeftModel.from_pretrained`), the head reads the pooled features (docs/models.md).
    """
    folder = Path(folder)
    spec = json.loads((folder / HEAD_CONFIG).read_text())
    head = make_head(spec["classifier"], spec["in_features"], spec["out_features"])
    head.load_state_dict(load_file(str(folder / HEAD_FILE)), strict=True)
    return head, list(spec["labels"])


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
