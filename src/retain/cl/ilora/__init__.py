"""I-LoRA (seed 000): plastic `default` and stable `ema` LoRA adapters, reservoir replay and a
selective hidden-state consistency loss. `cl_method: ilora` (or `use_ilora: true`). See README.md."""

from retain.cl.ilora.ilora import ILORA, Buffer, ILORAArguments
from retain.cl.ilora.ilora_adapter import init_ilora_adapter
from retain.cl.ilora.ilora_loader import load_ilora_model
from retain.cl.ilora.ilora_trainer import ILORATrainer
from retain.cl.ilora.ilora_workflow import run_sft_ilora

__all__ = [
    "ILORA",
    "Buffer",
    "ILORAArguments",
    "ILORATrainer",
    "init_ilora_adapter",
    "load_ilora_model",
    "run_sft_ilora",
]
