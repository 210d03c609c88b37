"""Moved into `retain bench cil` (src/retain/bench/cil.py); this wrapper forwards its arguments.

    python benchmarks/pertask_cil_eval.py --model all-minilm-l6-v2 --tasks 2 4 8 --rows 256
    # the same as: retain bench cil --model all-minilm-l6-v2 --tasks 2 4 8 --rows 256

The command now trains the tasks (so the router's task-identification accuracy means something)
and times the CIL evaluation of the whole matrix row after task T, not of one task's test split.
See benchmarks/README.md.
"""

from __future__ import annotations

import sys

from retain.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "cil", *sys.argv[1:]]))
