"""`multitask`: the joint-training reference ("upper bound"), not a continual method."""

from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="multitask",
        summary='the joint-training reference ("upper bound"), not a continual method',
        implementation="retain.cl.multitask.method:MultiTask",
    )
)
