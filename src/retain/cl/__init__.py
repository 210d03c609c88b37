"""Continual-learning methods: the interface (`base`, `registry`, `loss`) and one package per method.

Each method package's `__init__.py` registers a `MethodSpec` and stays light (no torch); the
registry imports a method's implementation only when a run uses it. `method_specs()` imports the
packages listed here and any module named by an entry point of the group `retain.methods`.
"""

BUILTIN_METHOD_PACKAGES = (
    "retain.cl.seq",
    "retain.cl.replay",
    "retain.cl.multitask",
    "retain.cl.ilora",
    "retain.cl.pertask",
    "retain.cl.olora",
    "retain.cl.nlora",
    "retain.cl.inflora",
    "retain.cl.ewc",
    "retain.cl.lwf",
    "retain.cl.gem",
    "retain.cl.agem",
    "retain.cl.lamol",
    "retain.cl.pseudo_replay",
    "retain.cl.ssr",
)
