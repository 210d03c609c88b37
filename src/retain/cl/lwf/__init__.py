"""`lwf`: `seq` plus Learning without Forgetting on the model's own token distribution. See docs/methods/lwf.md."""

from retain.cl.lwf.config import LwFArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="lwf",
        summary="LwF: seq plus distillation from the previous task's adapter on the answer tokens",
        implementation="retain.cl.lwf.method:LwF",
        arguments=LwFArguments,
    )
)
