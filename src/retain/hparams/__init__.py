"""Configuration: the dataclass groups, LLaMA-Factory/EasyCL key handling and the YAML parser.

`retain.load_config` / `retain.parse_config` (in `retain.cl.registry`) add the registered methods'
keys; this package imports no method code and no torch until a config is built.
"""

from retain.hparams.args import (
    CLArguments,
    CommonCLArguments,
    DataArguments,
    FinetuningArguments,
    GeneratingArguments,
    ModelArguments,
)
from retain.hparams.parser import RunConfig

__all__ = [
    "CLArguments",
    "CommonCLArguments",
    "DataArguments",
    "FinetuningArguments",
    "GeneratingArguments",
    "ModelArguments",
    "RunConfig",
]
