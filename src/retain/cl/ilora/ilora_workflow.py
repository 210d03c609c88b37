"""`run_sft_ilora`: the generic task run (`retain.training.sequence.Session`) with I-LoRA as the method.

The session trains every task with the engine's trainer and the method's hooks (the EMA update is
I-LoRA's callback), hands the state over between tasks and evaluates with the EMA adapter; nothing
of the workflow is repeated here. This module belongs to the API layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retain.api import resolve_config
from retain.errors import ConfigError
from retain.hparams.parser import RunConfig


def run_sft_ilora(
    config: RunConfig | str | Path | dict[str, Any],
    *,
    train: bool = True,
    evaluate: bool = True,
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any] | None:
    """Train (and evaluate) a task sequence with I-LoRA; returns the metrics when evaluating.

    A path or dict config gets `use_ilora: true` added (a config naming another method is an error).
    """
    from retain.training.sequence import Session

    if not isinstance(config, RunConfig):
        overrides = {"use_ilora": True, **overrides}
    run_config = resolve_config(config, overrides)
    if run_config.cl.cl_method != "ilora":
        raise ConfigError(
            f"run_sft_ilora runs I-LoRA, but the config selects '{run_config.cl.cl_method}'",
            field="cl_method",
        )
    return Session(run_config, force=force).run(train=train, evaluate=evaluate)
