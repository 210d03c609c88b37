"""I-LoRA (seed 000): plastic `default` and stable `ema` LoRA adapters, reservoir replay and a
selective hidden-state consistency loss. `cl_method: ilora` (or `use_ilora: true`). See README.md.

Importing this package registers the method and loads nothing heavy. The seed's public names
(`ILORA`, `ILORATrainer`, `run_sft_ilora`, ...) are imported from their modules on first use:
`ILORATrainer` belongs to the training layer and `run_sft_ilora` to the API layer
(docs/architecture.md), so the method's own modules never import them.
"""

import importlib

from retain.cl.ilora.config import ILORAArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="ilora",
        summary="I-LoRA: a plastic and an EMA-stable LoRA adapter, replay and a hidden-state consistency loss",
        implementation="retain.cl.ilora.ilora:ILORA",
        arguments=ILORAArguments,
    )
)

#: The seed's public names -> the module that defines each.
_EXPORTS = {
    "ILORA": "retain.cl.ilora.ilora",
    "Buffer": "retain.cl.ilora.ilora",
    "init_ilora_adapter": "retain.cl.ilora.ilora_adapter",
    "load_ilora_model": "retain.cl.ilora.ilora_loader",
    "ILORATrainer": "retain.cl.ilora.ilora_trainer",
    "run_sft_ilora": "retain.cl.ilora.ilora_workflow",
}

__all__ = ["SPEC", "ILORAArguments", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
