"""Continual-learning methods. Importing this package registers the built-in ones."""

from retain.cl import replay, seq  # noqa: F401
from retain.cl.base import CLMethod, Task, get_method, method_registry, register_method

__all__ = ["CLMethod", "Task", "get_method", "method_registry", "register_method"]
