"""`replay`: sequential LoRA fine-tuning plus replay of earlier tasks' rows."""

from retain.cl.registry import MethodSpec, register_method
from retain.cl.replay.config import ReplayArguments

SPEC = register_method(
    MethodSpec(
        name="replay",
        summary="sequential LoRA fine-tuning plus replay of earlier tasks' rows",
        implementation="retain.cl.replay.method:Replay",
        arguments=ReplayArguments,
    )
)
