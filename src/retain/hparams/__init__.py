from retain.hparams.args import (
    CLArguments,
    CommonCLArguments,
    DataArguments,
    FinetuningArguments,
    GeneratingArguments,
    ModelArguments,
)
from retain.hparams.parser import RunConfig, load_config, parse_config

__all__ = [
    "CLArguments",
    "CommonCLArguments",
    "DataArguments",
    "FinetuningArguments",
    "GeneratingArguments",
    "ModelArguments",
    "RunConfig",
    "load_config",
    "parse_config",
]
