"""`inflora`: InfLoRA, one LoRA per task stacked on the frozen earlier ones, whose down-projection A is
designed before the task from its inputs outside the earlier tasks' input subspace, then frozen (only B
trains). See docs/methods/inflora.md."""

from retain.cl.inflora.config import InfLoRAArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="inflora",
        summary="InfLoRA: a new LoRA per task whose frozen A avoids earlier tasks' input subspace; only B trains",
        implementation="retain.cl.inflora.method:InfLoRA",
        arguments=InfLoRAArguments,
    )
)
