"""The `peft` method (seed 004): one adapter per task, classifier heads, word-level tasks, NewLoRA.

Not named `peft`: that is the library's name. Importing this package registers `cl_method: peft`.
"""

from retain.cl.pertask.config import PEFTArguments
from retain.cl.pertask.heads import CosineLinear, make_head, pool
from retain.cl.pertask.labels import LabelSpace, map_word_targets
from retain.cl.pertask.method import PerTaskModel, PerTaskPEFT, adapter_name
from retain.cl.pertask.router import TaskRouter, preference_sum, route
from retain.cl.pertask.tagging import encode_words, entity_f1, entity_spans

__all__ = [
    "CosineLinear",
    "LabelSpace",
    "PEFTArguments",
    "PerTaskModel",
    "PerTaskPEFT",
    "TaskRouter",
    "adapter_name",
    "encode_words",
    "entity_f1",
    "entity_spans",
    "make_head",
    "map_word_targets",
    "pool",
    "preference_sum",
    "route",
]
