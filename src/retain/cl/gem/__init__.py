"""`gem`: Gradient Episodic Memory on the LoRA gradient. See docs/methods/gem.md."""

from retain.cl.gem.config import GEMArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="gem",
        summary="GEM: seq whose step gradient is projected so no earlier task's memory loss increases",
        implementation="retain.cl.gem.method:GEM",
        arguments=GEMArguments,
    )
)
