"""`retain bench`: performance measured as medians, with the compared variants side by side in one run.

One module per sub-benchmark, each with `NAME`, `HELP`, `add_arguments(parser)` and
`run(args) -> dict` (the JSON document it also writes with `--json`). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

#: Sub-benchmark name -> module (imported only when that sub-benchmark runs or its help is asked for).
SUBCOMMANDS = {
    "step-time": "retain.bench.step_time",
    "eval": "retain.bench.eval_time",
    "scaling": "retain.bench.scaling",
    "cil": "retain.bench.cil",
    "write": "retain.bench.writing",
}


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_bench_module=module_name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return importlib.import_module(args._bench_module).run(args)
