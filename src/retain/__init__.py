"""retain: continual learning for language models."""

from retain.api import evaluate, report, run, train
from retain.errors import RetainError
from retain.hparams.parser import RunConfig, load_config, parse_config

__version__ = "0.1.0"

__all__ = ["RetainError", "RunConfig", "evaluate", "load_config", "parse_config", "report", "run", "train"]
