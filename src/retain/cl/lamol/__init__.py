"""`lamol`: LAMOL, language modeling for lifelong language learning (Sun et al., 2020)."""

from retain.cl.lamol.config import LamolArguments
from retain.cl.registry import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="lamol",
        summary="LAMOL: the model also learns to write whole rows after a task marker, and writes rows of the "
        "earlier tasks to train with each new task (no real rows kept)",
        implementation="retain.cl.lamol.method:LAMOL",
        arguments=LamolArguments,
    )
)
