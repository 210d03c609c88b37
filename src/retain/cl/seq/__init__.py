"""`seq`: sequential fine-tuning of one LoRA adapter carried from task to task (the baseline)."""

from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="seq",
        summary="sequential fine-tuning of one LoRA adapter carried from task to task (the baseline)",
        implementation="retain.cl.seq.method:Seq",
    )
)
