"""Cross-run cache of the base model's row of the accuracy matrix (row 0).

Row 0 scores the untouched base model on every task's test split. It is the same in every run
that uses the same base weights, the same test rows, the same prompt format and the same
generation settings, whatever the method and its hyper-parameters. So it is computed once and
kept under `$RETAIN_CACHE/eval/` (default `~/.cache/retain/eval/`), one JSON file per matrix
entry, named by a hash of everything the entry depends on:

- the base weights (`base_model_id`): for a model read from files (a directory, a `.gguf`
  file, a prepared offline alias), every file's name, size and modification time plus the
  content of its small files (config, tokenizer); for a model fetched by hub id, the commit of
  the revision fetched; for a model built in code, a content hash of its weights; and the
  weights' dtype;
- how the method scores the base model (`CLMethod.base_evaluation_key()`; a method that returns
  None is never cached);
- the test rows: the exact prompt token ids (so the tokenizer, the chat template and the
  `template` option are covered), the raw examples, the gold answers and the label set;
- the generation settings: max new tokens, EOS and pad ids, eval batch size, prefix sharing;
- the device type, the number of processes, and the torch and transformers versions.

Change any of these and the key changes, so a stale entry is never read. `eval_base_cache:
false` turns the cache off. Files are written atomically by the main process; every process
uses the main process's lookup, so all of them skip (or run) the generation together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retain.eval.predict import EvalContext, Score
from retain.io import atomic_write_json, cache_root

if TYPE_CHECKING:
    from retain.data.tasks import TaskData
    from retain.hparams.args import ModelArguments

logger = logging.getLogger(__name__)

#: Bump when the meaning of a cached entry changes (scoring rules, key layout).
CACHE_VERSION = 2  # 2: label sets from label_list, off_label and rouge_l figures
#: Files at most this large are hashed by content in the model fingerprint (config, tokenizer).
SMALL_FILE = 4 << 20


def cache_dir() -> Path:
    return cache_root() / "eval"


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _files_id(path: Path) -> list[Any]:
    """Name, size and mtime of every file under `path` (a file or a folder; hidden entries such as
    `.git` left out); small files by content."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    out: list[Any] = []
    for file in files:
        stat = file.stat()
        entry: list[Any] = [file.name if file == path else file.relative_to(path).as_posix(), stat.st_size]
        if stat.st_size <= SMALL_FILE:
            entry.append(hashlib.sha256(file.read_bytes()).hexdigest())
        else:
            entry.append(stat.st_mtime_ns)
        out.append(entry)
    return out


def weights_hash(model: torch.nn.Module) -> str:
    """Content hash of a model's parameters and buffers (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_model_id(args: ModelArguments, model: torch.nn.Module) -> str:
    """A fingerprint of the base weights `load_model(args)` gave (`model`, before any adapter)."""
    from retain.model.aliases import ALIASES, alias_dir

    name = args.model_name_or_path
    dtype = str(next(model.parameters()).dtype)
    if name in ALIASES and ALIASES[name].package:
        source: Any = ["alias", name, _files_id(alias_dir(name, args.model_cache_dir))]
    elif name not in ALIASES and Path(name).expanduser().exists():
        path = Path(name).expanduser().resolve()
        source = ["path", str(path), _files_id(path)]
    elif name not in ALIASES and getattr(getattr(model, "config", None), "_commit_hash", None):
        source = ["hub", name, model.config._commit_hash]  # the exact revision fetched
    else:  # built in code (tiny-random-llama), or no revision known: hash what was loaded
        source = ["weights", name, weights_hash(model)]
    loading = [
        args.torch_dtype,
        args.flash_attn,
        args.quantization_bit,
        args.quantization_type,
        args.double_quantization,
    ]
    return _sha256([source, dtype, loading])


def _score_to_json(score: Score) -> dict[str, Any]:
    return dataclasses.asdict(score)


def _score_from_json(data: dict[str, Any]) -> Score:
    return Score(**data)


class BaseRowEntry:
    """The cached base-model score of one task, or the place to store it once computed."""

    def __init__(self, key: str, path: Path, meta: dict[str, Any]):
        self.key = key
        self.path = path
        self.meta = meta

    @classmethod
    def open(
        cls,
        model_id: str,
        method_key: str,
        data: TaskData,
        ctx: EvalContext,
        device: torch.device | str,
        root: Path | None = None,
    ) -> BaseRowEntry:
        """The entry for scoring the base model on `data` the way `method_key` names
        (`CLMethod.base_evaluation_key()`)."""
        from accelerate import PartialState

        prompts = [ctx.builder.prompt_ids(e) for e in data.test]
        examples = [[e.messages, e.system, e.answer, e.extra] for e in data.test]
        tokenizer = ctx.tokenizer
        payload = {
            "version": CACHE_VERSION,
            "model": model_id,
            "method": method_key,
            "prompts": _sha256(prompts),
            "examples": _sha256(examples),
            "labels": data.labels,
            "label_texts": data.label_texts,
            "tags": data.tags,
            "mode": ctx.mode,
            "choice_normalization": ctx.choice_normalization,
            "max_new_tokens": ctx.new_tokens_for(data),
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "batch_size": ctx.batch_size,
            "share_prefix": ctx.share_prefix,
            "device": torch.device(device).type,
            "processes": PartialState().num_processes,
            "torch": torch.__version__,
            "transformers": _transformers_version(),
        }
        key = _sha256(payload)
        meta = {"task": data.name, "test_rows": len(data.test), **payload}
        return cls(key, (root or cache_dir()) / f"{key}.json", meta)

    def load(self) -> Score | None:
        """The cached score (every process gets the main process's answer), or None."""
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        state = PartialState()
        found = None
        if state.is_main_process:
            found = self._read()
        if state.num_processes > 1:
            found = broadcast_object_list([found])[0]
        if found is None:
            return None
        logger.info("base model on %s: reusing the cached row entry %s", self.meta["task"], self.path)
        return _score_from_json(found)

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("key") != self.key or "score" not in data:
            return None
        return data["score"]

    def store(self, score: Score) -> None:
        from accelerate import PartialState

        if PartialState().is_main_process:
            atomic_write_json(self.path, {"key": self.key, "meta": self.meta, "score": _score_to_json(score)})


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
