"""Continual-learning methods.

Methods register themselves when their module is imported. `method_registry()` imports the
built-in modules listed here and any module a package declares under the entry-point group
`retain.methods`, so importing `retain.cl.base` alone never imports a method (no cycles).
"""

BUILTIN_METHOD_MODULES = (
    "retain.cl.seq",
    "retain.cl.replay",
    "retain.cl.multitask",
    "retain.cl.ilora",
    "retain.cl.pertask",
)
