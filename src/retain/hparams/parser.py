"""YAML + `key=value` overrides -> typed dataclasses. Unknown keys, wrong types and values that would
train nothing are errors, reported before anything runs.

This module knows the config groups, `transformers.TrainingArguments` and the LLaMA-Factory/EasyCL
keys (`retain.hparams.compat`), but no method: `build_run_config` gets every registered method's
config dataclass from the registry (`retain.cl.registry.parse_config` passes them), so parsing a
config imports no method code. transformers is imported only when a config is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from retain.errors import ConfigError
from retain.hparams.args import (
    TEMPLATE_NAMES,
    CLArguments,
    DataArguments,
    FinetuningArguments,
    GeneratingArguments,
    ModelArguments,
)
from retain.hparams.coerce import coerce_field, fields_of
from retain.hparams.compat import translate, unavailable_key_owners, unavailable_method

if TYPE_CHECKING:
    from transformers import TrainingArguments

GROUPS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "finetuning": FinetuningArguments,
    "generating": GeneratingArguments,
    "cl": CLArguments,
}

# Defaults that differ from transformers' own, chosen for continual-learning runs.
TRAINING_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 10,
    "remove_unused_columns": False,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 1e-4,
    "num_train_epochs": 1.0,
}


@dataclass
class RunConfig:
    """Everything a run needs, parsed and validated."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    generating: GeneratingArguments
    cl: CLArguments
    method_args: Any
    training: TrainingArguments
    source: str
    #: The flat key/values as the user gave them (file, then overrides), minus defaults.
    values: dict[str, Any]
    #: One-line notes for the user: keys accepted but not applied, choices made for them.
    notes: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir)

    def resolved(self) -> dict[str, Any]:
        """Every key of our own groups plus the training keys the user set: the run's full recipe."""
        out: dict[str, Any] = {}
        for group in (self.model, self.data, self.finetuning, self.generating, self.cl, self.method_args):
            if group is not None:
                out.update(dataclasses.asdict(group))
        for key in sorted(set(self.values) | set(TRAINING_DEFAULTS) | {"output_dir", "seed"}):
            if key in training_fields():
                value = getattr(self.training, key)
                out[key] = value.value if isinstance(value, enum.Enum) else value
        return out


def training_fields() -> dict[str, Any]:
    from transformers import TrainingArguments

    return fields_of(TrainingArguments)


# ---- reading --------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (not the last wins)."""

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice (first on line {first + 1})",
                    key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The top-level mapping of a YAML file (`what` names the file in the error when it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found", source=str(path))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML: {where}{problem}", source=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of key: value at the top level", source=str(path))
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}", source=str(path))
    return data


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected key=value, got {item!r}", source="command line")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        values[key.strip()] = value
    return values


# ---- routing ----------------------------------------------------------------------------


def _select_method(
    values: dict[str, Any], source: str, methods: Mapping[str, type | None], notes: list[str]
) -> str:
    """The chosen method from `cl_method` and the `use_<name>` switches (EasyCL's spelling)."""
    registered = set(methods)
    chosen: list[str] = []
    if values.get("cl_method") is not None:
        if not isinstance(values["cl_method"], str):
            raise ConfigError(
                f"expected a method name, got {values['cl_method']!r}", source=source, field="cl_method"
            )
        chosen.append(values["cl_method"])
    for key in [k for k in values if k.startswith("use_")]:
        name = key[4:]
        if name not in registered and not unavailable_method(name, registered):
            continue  # not a method switch: reported with the unknown keys
        flag = coerce_field(values[key], bool, key, source)
        if flag and name not in chosen:
            chosen.append(name)
        elif not flag and name in chosen:
            raise ConfigError(f"contradicts cl_method: {name}", source=source, field=key)
    if len(chosen) > 1:
        raise ConfigError(
            f"two methods enabled ({' and '.join(chosen)}); choose one", source=source, field="cl_method"
        )
    if not chosen:
        notes.append(
            "no method named (cl_method, or use_<method>: true): running 'seq', plain sequential LoRA"
        )
        return "seq"
    name = chosen[0]
    available = ", ".join(sorted(registered))
    missing = unavailable_method(name, registered)
    if missing:
        key = f"use_{name}" if f"use_{name}" in values else "cl_method"
        raise ConfigError(
            f"the {missing} method is not available in this version (available: {available})",
            source=source,
            field=key,
        )
    if name not in registered:
        raise ConfigError(
            f"unknown method '{name}'; available: {available}", source=source, field="cl_method"
        )
    return name


def _reject_unknown(problems: dict[str, str], known: set[str], source: str) -> None:
    """One error for every key that is not accepted, each with the closest known key."""
    if not problems:
        return
    parts = []
    for key, reason in problems.items():
        if reason == "unknown":
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
            reason = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
        parts.append((key, reason))
    hint = " (see `retain keys` for the accepted ones)"
    if len(parts) == 1:
        key, reason = parts[0]
        raise ConfigError(reason + hint, source=source, field=key)
    listed = "; ".join(f"'{key}': {reason}" for key, reason in parts)
    raise ConfigError(f"{len(parts)} keys are not accepted: {listed}{hint}", source=source)


def build_run_config(values: dict[str, Any], source: str, methods: Mapping[str, type | None]) -> RunConfig:
    """Validate flat config values. `methods` maps each registered method to its config dataclass."""
    values, notes = translate(values, source)
    method_name = _select_method(values, source, methods, notes)
    method_cls = methods[method_name]
    registered = set(methods)

    owners: dict[str, type] = {key: cls for cls in GROUPS.values() for key in fields_of(cls)}
    if method_cls is not None:
        owners.update({key: method_cls for key in fields_of(method_cls)})
    foreign: dict[str, list[str]] = {}  # key -> the other methods that accept it
    for other, cls in sorted(methods.items()):
        if cls is not None and cls is not method_cls:
            for key in fields_of(cls):
                if key not in owners:
                    foreign.setdefault(key, []).append(other)
    training = training_fields()
    problems: dict[str, str] = {}
    for key in values:
        if key in owners or key in training:
            continue
        if key.startswith("use_") and (key[4:] in registered or unavailable_method(key[4:], registered)):
            continue
        if key in foreign:
            named = ", ".join(f"'{name}'" for name in foreign[key])
            kind = "method" if len(foreign[key]) == 1 else "methods"
            problems[key] = f"belongs to {kind} {named}, but the method is '{method_name}'"
        elif owned := unavailable_key_owners(key, registered):
            problems[key] = (
                f"a key of EasyCL's {' or '.join(owned)} method, which is not available in this version"
            )
        else:
            problems[key] = "unknown"
    _reject_unknown(problems, set(owners) | set(training) | set(foreign), source)

    grouped: dict[type, dict[str, Any]] = {cls: {} for cls in {*GROUPS.values(), method_cls} if cls}
    training_values: dict[str, Any] = {}
    for key, value in values.items():
        if key in owners:
            grouped[owners[key]][key] = coerce_field(value, fields_of(owners[key])[key], key, source)
        elif key in training:
            training_values[key] = coerce_field(value, training[key], key, source)
    grouped[CLArguments]["cl_method"] = method_name
    # A method's own `use_<name>` field says whether it is selected, so it is true however it was chosen.
    if method_cls is not None and f"use_{method_name}" in fields_of(method_cls):
        grouped[method_cls][f"use_{method_name}"] = True

    def build(cls: type) -> Any:
        try:
            return cls(**grouped[cls])
        except ConfigError as exc:
            if exc.source is None:
                raise ConfigError(str(exc).split(": ", 1)[-1], source=source, field=exc.field) from None
            raise

    data = build(DataArguments)
    if data.template not in TEMPLATE_NAMES:
        notes.append(
            f"'template': '{data.template}' is not a template retain knows ({', '.join(TEMPLATE_NAMES)}): "
            "using the model's own chat template (auto)"
        )
    model, generating = build(ModelArguments), build(GeneratingArguments)
    if generating.eval_mode != "generate" and model.flash_attn == "fa2":
        raise ConfigError(
            f"eval_mode {generating.eval_mode} scores the labels under a custom attention mask, which "
            "flash_attn fa2 cannot take: use flash_attn sdpa (or eval_mode generate)",
            source=source,
            field="eval_mode",
        )
    return RunConfig(
        model=model,
        data=data,
        finetuning=build(FinetuningArguments),
        generating=generating,
        cl=build(CLArguments),
        method_args=build(method_cls) if method_cls is not None else None,
        training=_training_arguments(training_values, source, notes),
        source=source,
        values=values,
        notes=notes,
    )


# ---- training arguments -----------------------------------------------------------------------------


def _check_trains_something(kwargs: dict[str, Any], source: str) -> None:
    """Values that would train nothing, or nonsense, are errors (transformers accepts some of them)."""
    if kwargs["learning_rate"] <= 0:
        raise ConfigError(f"must be > 0, got {kwargs['learning_rate']}", source=source, field="learning_rate")
    max_steps = kwargs.get("max_steps", -1)
    if max_steps == 0 or max_steps < -1:
        raise ConfigError(
            f"must be a positive number of optimizer steps per task, or -1 to train num_train_epochs; got {max_steps}",
            source=source,
            field="max_steps",
        )
    if max_steps == -1 and kwargs["num_train_epochs"] <= 0:
        raise ConfigError(
            f"must be > 0 (or set max_steps > 0), got {kwargs['num_train_epochs']}: no task would be trained",
            source=source,
            field="num_train_epochs",
        )
    for key in ("seed", "data_seed"):
        if kwargs.get(key) is not None and not 0 <= kwargs[key] < 2**32:
            raise ConfigError(f"must be in [0, 2**32 - 1], got {kwargs[key]}", source=source, field=key)
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        if key in kwargs and kwargs[key] < 1:
            raise ConfigError(f"must be at least 1, got {kwargs[key]}", source=source, field=key)


def _half_precision_fallback(kwargs: dict[str, Any], notes: list[str]) -> None:
    """bf16/fp16 without a GPU that supports them: train in float32 and say so."""
    import torch

    for key in ("bf16", "fp16"):
        if not kwargs.get(key):
            continue
        supported = torch.cuda.is_available() and (key == "fp16" or torch.cuda.is_bf16_supported())
        if not supported:
            kwargs[key] = False
            notes.append(f"'{key}': this machine has no GPU with {key} support; training in float32 instead")


def _multi_process_without_accelerator() -> bool:
    import os

    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _training_arguments(values: dict[str, Any], source: str, notes: list[str]) -> TrainingArguments:
    from transformers import TrainingArguments

    kwargs = {**TRAINING_DEFAULTS, **values}
    _check_trains_something(kwargs, source)
    _half_precision_fallback(kwargs, notes)
    if "save_steps" in values and "save_strategy" not in values:
        kwargs["save_strategy"] = "steps"
    kwargs.setdefault("output_dir", str(Path("runs") / Path(source).stem))
    if "use_cpu" not in values and _multi_process_without_accelerator():
        kwargs["use_cpu"] = True  # torchrun on CPUs: DDP over gloo
    try:
        arguments = TrainingArguments(**kwargs)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"invalid training arguments: {message}", source=source) from None
    _check_reporting(arguments.report_to, source)
    return arguments


def _check_reporting(report_to: list[str], source: str) -> None:
    """Each `report_to` integration must be installed (transformers would fail later with a traceback)."""
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    missing = [name for name in report_to if name not in available]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} is not installed here (pip install {' '.join(missing)}), "
            f"or set report_to: none; installed: {', '.join(sorted(available)) or 'none'}",
            source=source,
            field="report_to",
        )
