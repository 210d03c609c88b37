"""`olora`: O-LoRA, one LoRA per task stacked on the frozen earlier ones, with an orthogonality penalty
between the current task's A and the earlier tasks' A (`orthogonal_lambda: 0` is IncLoRA)."""

from retain.cl.olora.config import OLoRAArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="olora",
        summary="O-LoRA: a new LoRA per task on the frozen earlier ones, kept orthogonal to them "
        "(orthogonal_lambda: 0 is IncLoRA)",
        implementation="retain.cl.olora.method:OLoRA",
        arguments=OLoRAArguments,
    )
)
