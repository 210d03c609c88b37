"""A-GEM's config keys (EasyCL has no A-GEM): the switch, the memory size and the reference batch size."""

from __future__ import annotations

from dataclasses import dataclass

from retain.errors import ConfigError
from retain.hparams.option import option


@dataclass
class AGEMArguments:
    """Arguments of the A-GEM method (docs/methods/agem.md)."""

    agem_memory_size: int = option(
        256,
        "Rows kept per earlier task (a reservoir sample of its train rows); as gem_memory_size. "
        "0: no memory, trains exactly like seq.",
    )
    agem_batch_size: int | None = option(
        None,
        "Memory rows per step, drawn from all earlier tasks' memories together, whose mean loss "
        "gives the reference gradient. Default: the optimizer step's global batch "
        "(per_device_train_batch_size x gradient_accumulation_steps x processes).",
    )

    def __post_init__(self) -> None:
        if self.agem_memory_size < 0:
            raise ConfigError("must be >= 0", field="agem_memory_size")
        if self.agem_batch_size is not None and self.agem_batch_size < 1:
            raise ConfigError("must be >= 1 (or unset: the step's global batch)", field="agem_batch_size")
