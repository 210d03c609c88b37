"""retain: continual learning for language models.

The names below are imported on first use, so `import retain` (and the `retain` command's help)
does not load torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "RetainError": "retain.errors",
    "RunConfig": "retain.hparams.parser",
    "load_config": "retain.cl.registry",
    "parse_config": "retain.cl.registry",
    "run": "retain.api",
    "train": "retain.api",
    "evaluate": "retain.api",
    "report": "retain.api",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
