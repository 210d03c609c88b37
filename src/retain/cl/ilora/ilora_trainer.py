"""`ILORATrainer`: the shared `CLTrainer` with an I-LoRA method wired in (no training loop of its own).

The engine's trainer already asks the method for the loss (`ILORA.compute_loss`) and, once per
optimizer step, lets it plan the step's replay rows (`ILORA.begin_step`). This subclass only makes
sure it holds an `ILORA` instance and that the EMA callback runs after every optimizer step, so it
can also be built directly, outside `retain.training.sequence.Session`.
"""

from __future__ import annotations

from typing import Any

from retain.cl.base import Task
from retain.cl.ilora.ilora import ILORA, ILORACallback
from retain.training.trainer import CLTrainer


class ILORATrainer(CLTrainer):
    def __init__(
        self, *args: Any, task: Task, method: ILORA | None = None, ilora: ILORA | None = None, **kwargs: Any
    ):
        if method is not None and ilora is not None and method is not ilora:
            raise TypeError("pass the I-LoRA instance once, as `ilora` or as `method`")
        ilora = ilora or method
        if not isinstance(ilora, ILORA):
            raise TypeError(f"ILORATrainer needs an ILORA method, got {type(ilora).__name__}")
        super().__init__(*args, method=ilora, task=task, **kwargs)
        self.ilora = ilora
        registered = any(
            isinstance(cb, ILORACallback) and cb.method is ilora for cb in self.callback_handler.callbacks
        )
        if not registered:
            self.add_callback(ILORACallback(ilora))
