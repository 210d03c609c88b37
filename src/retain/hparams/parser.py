"""YAML + `key=value` overrides -> typed dataclasses. Unknown keys and wrong types are errors."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from retain.errors import ConfigError
from retain.hparams.args import (
    CLArguments,
    DataArguments,
    FinetuningArguments,
    GeneratingArguments,
    ModelArguments,
)

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
            if key in _training_fields():
                value = getattr(self.training, key)
                out[key] = value.value if isinstance(value, enum.Enum) else value
        return out


def _training_fields() -> dict[str, Any]:
    return _fields_of(TrainingArguments)


_FIELD_CACHE: dict[type, dict[str, Any]] = {}


def _fields_of(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_CACHE:
        hints = typing.get_type_hints(cls)
        _FIELD_CACHE[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    return _FIELD_CACHE[cls]


def field_help(cls: type) -> list[tuple[str, str, str]]:
    """(key, default, help) for every field of a config dataclass."""
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        )
        rows.append((f.name, repr(default), f.metadata.get("help", "")))
    return rows


# ---- type coercion -------------------------------------------------------------------------


class _Mismatch(Exception):
    pass


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " or ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML value to the field type, or raise _Mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        # Exact-type members first, so `int | str` keeps 3 as 3.
        ordered = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
        for arg in ordered:
            try:
                return coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if origin is list or tp is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return [coerce(item, item_tp) for item in value]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise _Mismatch from None
    return value


def _coerce_field(value: Any, tp: Any, key: str, source: str) -> Any:
    try:
        return coerce(value, tp)
    except _Mismatch:
        raise ConfigError(f"expected {_describe(tp)}, got {value!r}", source=source, field=key) from None


# ---- reading --------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", source=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), **extra: Any) -> RunConfig:
    """Read a YAML config, apply `key=value` overrides and keyword values, and validate."""
    values = read_yaml(path)
    values.update(parse_overrides(overrides))
    values.update(extra)
    return parse_config(values, source=str(path))


# ---- routing ----------------------------------------------------------------------------


def _select_method(values: dict[str, Any], source: str) -> str:
    from retain.cl.base import get_method, method_registry

    registry = method_registry()
    chosen: list[str] = []
    if "cl_method" in values and values["cl_method"] is not None:
        if not isinstance(values["cl_method"], str):
            raise ConfigError(
                f"expected a method name, got {values['cl_method']!r}", source=source, field="cl_method"
            )
        chosen.append(values["cl_method"])
    for key in list(values):
        if key.startswith("use_") and key[4:] in registry:
            flag = _coerce_field(values[key], bool, key, source)
            if flag and key[4:] not in chosen:
                chosen.append(key[4:])
            elif not flag and key[4:] in chosen:
                raise ConfigError(f"contradicts cl_method: {key[4:]}", source=source, field=key)
    if len(chosen) > 1:
        raise ConfigError(
            f"two methods enabled ({' and '.join(chosen)}); choose one", source=source, field="cl_method"
        )
    name = chosen[0] if chosen else "seq"
    try:
        get_method(name)
    except ConfigError as exc:
        raise ConfigError(str(exc).split(": ", 1)[1], source=source, field="cl_method") from None
    return name


def _multi_process_without_accelerator() -> bool:
    import os

    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def parse_config(values: dict[str, Any], source: str = "<config>") -> RunConfig:
    from retain.cl.base import get_method, method_registry

    values = dict(values)
    method_name = _select_method(values, source)
    method_cls = get_method(method_name)
    registry = method_registry()

    # Which keys belong to which group.
    owners: dict[str, str] = {}
    for group, cls in GROUPS.items():
        for key in _fields_of(cls):
            owners[key] = group
    foreign: dict[str, str] = {}
    for other_name, other_cls in registry.items():
        if other_cls.arguments is not None and other_cls is not method_cls:
            for key in _fields_of(other_cls.arguments):
                foreign[key] = other_name
    if method_cls.arguments is not None:
        for key in _fields_of(method_cls.arguments):
            owners[key] = "method"
    training_fields = _training_fields()

    grouped: dict[str, dict[str, Any]] = {name: {} for name in [*GROUPS, "method", "training"]}
    for key, value in values.items():
        if key.startswith("use_") and key[4:] in registry:
            if key in owners:  # the method's own `use_<name>` field
                grouped["method"][key] = True
            continue
        if key in owners:
            group = owners[key]
            cls = GROUPS.get(group) or method_cls.arguments
            grouped[group][key] = _coerce_field(value, _fields_of(cls)[key], key, source)
        elif key in training_fields:
            grouped["training"][key] = _coerce_field(value, training_fields[key], key, source)
        elif key in foreign:
            raise ConfigError(
                f"belongs to method '{foreign[key]}', but the method is '{method_name}'",
                source=source,
                field=key,
            )
        else:
            raise ConfigError(
                "unknown key (see `retain keys` for the accepted ones)", source=source, field=key
            )
    grouped["cl"]["cl_method"] = method_name
    # A method's own `use_<name>` field says whether it is selected, so it is true however it was chosen
    # (`cl_method: x` and `use_x: true` then resolve to the same config).
    if owners.get(f"use_{method_name}") == "method":
        grouped["method"][f"use_{method_name}"] = True

    def build(cls: type, kwargs: dict[str, Any]) -> Any:
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            if exc.source is None:
                raise ConfigError(str(exc).split(": ", 1)[-1], source=source, field=exc.field) from None
            raise

    model = build(ModelArguments, grouped["model"])
    data = build(DataArguments, grouped["data"])
    finetuning = build(FinetuningArguments, grouped["finetuning"])
    generating = build(GeneratingArguments, grouped["generating"])
    cl = build(CLArguments, grouped["cl"])
    method_args = build(method_cls.arguments, grouped["method"]) if method_cls.arguments else None

    training_kwargs = {**TRAINING_DEFAULTS, **grouped["training"]}
    if "save_steps" in grouped["training"] and "save_strategy" not in grouped["training"]:
        training_kwargs["save_strategy"] = "steps"
    training_kwargs.setdefault("output_dir", str(Path("runs") / Path(source).stem))
    if "use_cpu" not in grouped["training"] and _multi_process_without_accelerator():
        training_kwargs["use_cpu"] = True  # torchrun on CPUs: DDP over gloo
    try:
        training = TrainingArguments(**training_kwargs)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"invalid training arguments: {message}", source=source) from None
    return RunConfig(
        model=model,
        data=data,
        finetuning=finetuning,
        generating=generating,
        cl=cl,
        method_args=method_args,
        training=training,
        source=source,
        values=values,
    )
