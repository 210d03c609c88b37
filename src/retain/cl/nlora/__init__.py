"""`nlora`: N-LoRA, one LoRA per task stacked on the frozen earlier ones, with an L1 penalty on the
current task's update B_t A_t (sparse updates collide less)."""

from retain.cl.nlora.config import NLoRAArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="nlora",
        summary="N-LoRA: a new LoRA per task on the frozen earlier ones, with an L1 penalty on its update B A",
        implementation="retain.cl.nlora.method:NLoRA",
        arguments=NLoRAArguments,
    )
)
