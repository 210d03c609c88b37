"""`ewc`: `seq` plus Elastic Weight Consolidation on the LoRA weights. See docs/methods/ewc.md."""

from retain.cl.ewc.config import EWCArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="ewc",
        summary="EWC: seq plus a diagonal-Fisher penalty that keeps the LoRA weights near earlier tasks' values",
        implementation="retain.cl.ewc.method:EWC",
        arguments=EWCArguments,
    )
)
