"""`pseudo_replay`: seq plus replay of rows the base model writes for each finished task."""

from retain.cl.pseudo_replay.config import PseudoReplayArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="pseudo_replay",
        summary="pseudo-replay: the base model writes new rows of each finished task from a few-shot prompt; "
        "they are replayed with later tasks (no real rows kept)",
        implementation="retain.cl.pseudo_replay.method:PseudoReplay",
        arguments=PseudoReplayArguments,
    )
)
