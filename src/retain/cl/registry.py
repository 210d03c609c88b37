"""The method registry: which methods exist, their config keys, and where their code lives.

A method declares a `MethodSpec` in its package's `__init__.py` (a light module: no torch), and
the registry imports the implementation only when a run needs it. So listing methods, checking a
config's keys and printing help never import torch or transformers.

Built-in methods are the packages in `retain.cl.BUILTIN_METHOD_PACKAGES`; other packages add
theirs with an entry point in the group `retain.methods` naming a module that registers a spec.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retain.errors import ConfigError

if TYPE_CHECKING:
    from retain.cl.base import CLMethod
    from retain.hparams.parser import RunConfig

ENTRY_POINT_GROUP = "retain.methods"


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows of a method without importing its code."""

    #: The name a config selects it by (`cl_method: NAME` or `use_NAME: true`).
    name: str
    #: One line for `retain methods`.
    summary: str
    #: Where the `CLMethod` subclass lives, as "package.module:ClassName".
    implementation: str
    #: The dataclass of the method's own config keys (None: it has none).
    arguments: type | None = None


_SPECS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (call it at import time of a light module); returns the spec."""
    if not spec.name or ":" not in spec.implementation:
        raise TypeError(f"a MethodSpec needs a name and an implementation 'module:Class', got {spec!r}")
    known = _SPECS.get(spec.name)
    if known is not None and known != spec:
        raise TypeError(f"method name '{spec.name}' is registered twice")
    _SPECS[spec.name] = spec
    return spec


def method_specs() -> dict[str, MethodSpec]:
    """Every registered method, after importing the built-in method packages and the entry points."""
    from importlib.metadata import entry_points

    from retain.cl import BUILTIN_METHOD_PACKAGES

    for package in BUILTIN_METHOD_PACKAGES:
        importlib.import_module(package)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(point.value)
    return dict(_SPECS)


def get_spec(name: str) -> MethodSpec:
    specs = method_specs()
    if name not in specs:
        raise ConfigError(
            f"unknown method '{name}'; available: {', '.join(sorted(specs))}", field="cl_method"
        )
    return specs[name]


def load_method(name: str) -> type[CLMethod]:
    """The method's class (this imports its implementation, and with it torch)."""
    from retain.cl.base import CLMethod

    spec = get_spec(name)
    module_name, _, class_name = spec.implementation.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, CLMethod)) or cls.spec is not spec:
        raise TypeError(f"{spec.implementation} is not the CLMethod subclass of the spec '{spec.name}'")
    return cls


def method_arguments() -> dict[str, type | None]:
    """Method name -> the dataclass of its config keys: what the config parser checks keys against."""
    return {name: spec.arguments for name, spec in method_specs().items()}


def parse_config(values: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate flat config values against the config groups and the registered methods."""
    from retain.hparams.parser import build_run_config

    return build_run_config(values, source, method_arguments())


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), **extra: Any) -> RunConfig:
    """Read a YAML config, apply `key=value` overrides and keyword values, and validate."""
    from retain.hparams.parser import parse_overrides, read_yaml

    values = read_yaml(path)
    values.update(parse_overrides(overrides))
    values.update(extra)
    return parse_config(values, source=str(path))
