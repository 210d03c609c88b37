"""The Python API: the same steps as the `retain` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retain.cl.registry import load_config, parse_config
from retain.eval.report import load_metrics, write_results
from retain.hparams.parser import RunConfig

ConfigLike = RunConfig | str | Path | dict[str, Any]


def resolve_config(config: ConfigLike, overrides: dict[str, Any]) -> RunConfig:
    """A `RunConfig` from a parsed config, a YAML path or a dict of values (plus overrides)."""
    if isinstance(config, RunConfig):
        if overrides:
            raise TypeError("pass overrides with a path or a dict, not with a RunConfig")
        return config
    if isinstance(config, dict):
        return parse_config({**config, **overrides})
    return load_config(config, **overrides)


def _session_run(
    config: ConfigLike, force: bool, overrides: dict[str, Any], *, train: bool, evaluate: bool
) -> tuple[Any, dict[str, Any] | None]:
    from retain.training.sequence import Session

    session = Session(resolve_config(config, overrides), force=force)
    return session, session.run(train=train, evaluate=evaluate)


def run(config: ConfigLike, *, force: bool = False, **overrides: Any) -> dict[str, Any]:
    """Train every task, evaluate after each one, write metrics and the report; return the metrics."""
    return _session_run(config, force, overrides, train=True, evaluate=True)[1]


def train(config: ConfigLike, *, force: bool = False, **overrides: Any) -> Path:
    """Train every task and save each task's state; no evaluation. Returns the output directory."""
    return _session_run(config, force, overrides, train=True, evaluate=False)[0].output_dir


def evaluate(config: ConfigLike, *, force: bool = False, **overrides: Any) -> dict[str, Any]:
    """Evaluate the saved task states of a trained run; write metrics and the report."""
    return _session_run(config, force, overrides, train=False, evaluate=True)[1]


def report(run_dir: str | Path) -> dict[str, Any]:
    """Rebuild report.md, the CSV and the plots from a run's metrics.json."""
    metrics = load_metrics(run_dir)
    write_results(run_dir, metrics)
    return metrics
