"""`agem`: Averaged GEM on the LoRA gradient. See docs/methods/agem.md."""

from retain.cl.agem.config import AGEMArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="agem",
        summary="A-GEM: seq whose step gradient is projected off one reference gradient of earlier tasks' memories",
        implementation="retain.cl.agem.method:AGEM",
        arguments=AGEMArguments,
    )
)
