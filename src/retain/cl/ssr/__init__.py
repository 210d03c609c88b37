"""`ssr`: Self-Synthesized Rehearsal (Huang et al., ACL 2024). See docs/methods/ssr.md."""

from retain.cl.registry import MethodSpec, register_method
from retain.cl.ssr.config import SSRArguments

SPEC = register_method(
    MethodSpec(
        name="ssr",
        summary="Self-Synthesized Rehearsal: the base model writes inputs of each finished task, the fine-tuned "
        "model answers them, K-means keeps diverse rows for later tasks (no real rows kept)",
        implementation="retain.cl.ssr.method:SSR",
        arguments=SSRArguments,
    )
)
