"""The Python API: the same steps as the `retain` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retain.eval.report import load_metrics, write_results
from retain.hparams.parser import RunConfig, load_config, parse_config


def _config(config: RunConfig | str | Path | dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            raise TypeError("pass overrides with a path or a dict, not with a RunConfig")
        return config
    if isinstance(config, dict):
        return parse_config({**config, **overrides})
    return load_config(config, **overrides)


def run(
    config: RunConfig | str | Path | dict[str, Any], *, force: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Train every task, evaluate after each one, write metrics and the report; return the metrics."""
    from retain.training.sequence import Session

    session = Session(_config(config, overrides), force=force)
    result = session.run(train=True, evaluate=True)
    assert result is not None
    return result


def train(config: RunConfig | str | Path | dict[str, Any], *, force: bool = False, **overrides: Any) -> Path:
    """Train every task and save each task's state; no evaluation. Returns the output directory."""
    from retain.training.sequence import Session

    session = Session(_config(config, overrides), force=force)
    session.run(train=True, evaluate=False)
    return session.output_dir


def evaluate(
    config: RunConfig | str | Path | dict[str, Any], *, force: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Evaluate the saved task states of a trained run; write metrics and the report."""
    from retain.training.sequence import Session

    session = Session(_config(config, overrides), force=force)
    result = session.run(train=False, evaluate=True)
    assert result is not None
    return result


def report(run_dir: str | Path) -> dict[str, Any]:
    """Rebuild report.md, the CSV and the plots from a run's metrics.json."""
    metrics = load_metrics(run_dir)
    write_results(run_dir, metrics)
    return metrics
