"""The `peft` method (seed 004): one adapter per task, classifier heads, word-level tasks, NewLoRA.

Not named `peft`: that is the library's name. Importing this package registers `cl_method: peft`
and loads nothing heavy; the method itself is `retain.cl.pertask.method.PerTaskPEFT`.
"""

from retain.cl.pertask.config import PEFTArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="peft",
        summary="one adapter per task on a frozen backbone (seed 004), with optional classifier heads",
        implementation="retain.cl.pertask.method:PerTaskPEFT",
        arguments=PEFTArguments,
    )
)
