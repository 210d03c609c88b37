"""`retain study SPEC.yaml`: a grid of runs (methods x orders x seeds ...) as one command.

A spec (see benchmarks/studies/) holds:
- `base`: a config file (relative to the spec's folder) and/or `config:` values over it;
- `variants`: named setting groups (`seq: {}`, `replay: {cl_method: replay, ...}`); a variant may
  name its own `base` file, which takes the place of the spec's (the spec's `config:` still applies);
- `grid`: config keys (and `variant`) with the values to cross, for example
  `{variant: [seq, replay], benchmark_order: [short1], seed: [42, 43]}`;
- `exclude`: grid points left out, `- {variant: seq_lr1e-3, seed: 43}` (every cell matching one);
- `overrides`: per-cell settings, `- {when: {variant: ilora, seed: 43}, set: {...}}`;
- `output_root` (default `runs/study/<spec name>`) and `report_dir` (default `output_root`).

Each cell is one run in `<output_root>/<other grid values>/<variant>_s<seed>`: `--list` prints the
cells, `--cell I` runs one (a Slurm job array runs one cell per task), `--lanes N` runs them all in
N local processes sharing the cores, `--report` compares the finished cells (mean and sd over seeds
per variant, `retain compare`) into `report_dir/<other grid values>/`. A finished cell is skipped
(one whose metrics.json copy is in report_dir counts as finished: delete the copy to run it again);
an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retain.errors import ConfigError
from retain.hparams.parser import read_yaml

SPEC_KEYS = {
    "base",
    "config",
    "variants",
    "grid",
    "exclude",
    "overrides",
    "output_root",
    "report_dir",
    "description",
}


@dataclass
class Cell:
    index: int
    #: The grid values of this cell (`variant` included).
    point: dict[str, Any]
    values: dict[str, Any]
    output_dir: Path
    label: str = ""
    #: Where --report keeps a copy of the cell's metrics.json: report_dir/<the grid values other than
    #: variant and seed>/<label>/ (the cells of one such folder are compared together).
    report_copy: Path = Path()

    def finished(self) -> bool:
        """The run folder holds metrics.json, or report_dir holds the copy (a clone without the runs)."""
        return (self.output_dir / "metrics.json").is_file() or self.report_copy.is_file()


@dataclass
class Study:
    path: Path
    cells: list[Cell] = field(default_factory=list)
    report_dir: Path = Path()


def _config_file(spec_dir: Path, name: Any, source: str, key: str) -> dict[str, Any]:
    if not isinstance(name, str):
        raise ConfigError("expected the path of a config file", source=source, field=key)
    if not (spec_dir / name).is_file():
        raise ConfigError(f"config file {spec_dir / name} not found", source=source, field=key)
    return read_yaml(spec_dir / name)


def _mapping(value: Any, source: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("expected a mapping of key: value", source=source, field=key)
    return dict(value)


def load_study(path: str | Path) -> Study:
    """Read a spec and expand its grid into cells (validated later, when a cell runs or is listed)."""
    path = Path(path)
    source = str(path)
    spec = read_yaml(path, "study spec")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown study keys: {', '.join(unknown)} (known: {', '.join(sorted(SPEC_KEYS))})", source=source
        )
    spec_dir = path.parent
    base = _config_file(spec_dir, spec["base"], source, "base") if "base" in spec else {}
    common = _mapping(spec.get("config"), source, "config")
    variants = _mapping(spec.get("variants"), source, "variants")
    grid = _mapping(spec.get("grid"), source, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError("expected a non-empty list of values", source=source, field=f"grid.{key}")
    if "variant" in grid:
        missing = [v for v in grid["variant"] if v not in variants]
        if missing:
            raise ConfigError(
                f"no variants named {', '.join(map(str, missing))}", source=source, field="grid.variant"
            )
    overrides = spec.get("overrides") or []
    if not isinstance(overrides, list) or not all(
        isinstance(o, dict) and set(o) <= {"when", "set"} for o in overrides
    ):
        raise ConfigError("expected a list of {when: {...}, set: {...}}", source=source, field="overrides")
    exclude = spec.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) for e in exclude):
        raise ConfigError("expected a list of {key: value} grid points", source=source, field="exclude")
    output_root = Path(spec.get("output_root") or Path("runs") / "study" / path.stem)
    study = Study(path=path, report_dir=Path(spec.get("report_dir") or output_root))
    keys = list(grid)
    points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]
    points = [p for p in points if not any(all(p.get(k) == v for k, v in e.items()) for e in exclude)]
    for index, point in enumerate(points):
        variant = point.get("variant")
        settings = _mapping(variants[variant], source, f"variants.{variant}") if variant is not None else {}
        if "base" in settings:  # the variant's own config file in place of the spec's base
            values = _config_file(spec_dir, settings.pop("base"), source, f"variants.{variant}.base")
        else:
            values = dict(base)
        values.update(common)
        values.update(settings)
        values.update({k: v for k, v in point.items() if k != "variant"})
        for entry in overrides:
            when = _mapping(entry.get("when"), source, "overrides.when")
            if all(point.get(k) == v for k, v in when.items()):
                values.update(_mapping(entry.get("set"), source, "overrides.set"))
        others = [str(point[k]) for k in keys if k not in ("variant", "seed")]
        name = str(variant if variant is not None else values.get("cl_method", "run"))
        label = f"{name}_s{point['seed']}" if "seed" in point else name
        output_dir = output_root.joinpath(*others, label)
        values["output_dir"] = str(output_dir)
        copy = study.report_dir.joinpath(*others, label, "metrics.json")
        study.cells.append(Cell(index, point, values, output_dir, label=label, report_copy=copy))
    _check_folders_differ(study.cells, source)
    return study


def _check_folders_differ(cells: list[Cell], source: str) -> None:
    """Two cells in one folder would resume each other's run: a grid that lists a value twice."""
    first: dict[Path, Cell] = {}
    for cell in cells:
        other = first.setdefault(cell.output_dir, cell)
        if other is not cell:
            raise ConfigError(
                f"cells {other.index} ({_point_text(other.point)}) and {cell.index} ({_point_text(cell.point)}) "
                f"would share the folder {cell.output_dir}: a grid list repeats a value",
                source=source,
                field="grid",
            )


def _point_text(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def _status(cell: Cell) -> str:
    """done, to do, or started with its progress (`started 7/14`: tasks trained of the sequence)."""
    if cell.finished():
        return "done"
    state = cell.output_dir / "state.json"
    if not state.is_file():
        return "to do"
    try:
        saved = json.loads(state.read_text(encoding="utf-8"))
        return f"started {len(saved['trained'])}/{len(saved['tasks'])}"
    except (OSError, ValueError, KeyError, TypeError):  # being written, or not a run's state
        return "started"


def list_cells(study: Study) -> str:
    from retain.cl.registry import parse_config

    lines = []
    for cell in study.cells:
        parse_config(cell.values, source=f"{study.path} cell {cell.index}")  # every cell's config is valid
        lines.append(f"{cell.index:3d}  {_status(cell):13s} {cell.output_dir}  ({_point_text(cell.point)})")
    return "\n".join(lines)


def run_cell(study: Study, index: int) -> dict[str, Any] | None:
    """Run cell `index` (0-based) in this process; a finished cell is skipped. Returns its metrics."""
    from retain.cl.registry import parse_config
    from retain.training.sequence import Session

    if not 0 <= index < len(study.cells):
        raise ConfigError(
            f"no cell {index}: the study has cells 0..{len(study.cells) - 1}", source=str(study.path)
        )
    cell = study.cells[index]
    if cell.finished():
        print(f"cell {index}: done already ({cell.output_dir})")
        return None
    return Session(parse_config(cell.values, source=f"{study.path} cell {index}")).run()


def run_lanes(study: Study, lanes: int, spec: str) -> int:
    """Every unfinished cell, in `lanes` local processes that split the cores between them."""
    todo = [cell.index for cell in study.cells if not cell.finished()]
    threads = max(1, (os.cpu_count() or 1) // lanes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running: dict[int, subprocess.Popen] = {}
    failed = []
    while todo or running:
        while todo and len(running) < lanes:
            index = todo.pop(0)
            command = [sys.executable, "-m", "retain", "study", spec, "--cell", str(index)]
            running[index] = subprocess.Popen(command, env=env)
            print(f"cell {index}: started ({study.cells[index].output_dir})", flush=True)
        time.sleep(0.5)
        for index, process in list(running.items()):
            if process.poll() is not None:
                del running[index]
                status = "finished" if process.returncode == 0 else f"failed (exit {process.returncode})"
                print(f"cell {index}: {status}", flush=True)
                if process.returncode != 0:
                    failed.append(index)
    if failed:
        print(f"cells that failed: {', '.join(map(str, failed))}; rerun them with --cell I", file=sys.stderr)
    return 1 if failed else 0


def report(study: Study) -> list[Path]:
    """Compare each group's finished cells under report_dir, with a copy of each cell's metrics.json there.

    A cell counts as finished when its run folder has metrics.json, or when report_dir already holds the
    copy (so the tables can be rebuilt from a clone that has the copies but not the runs).
    """
    from retain.eval.compare import compare, write_comparison
    from retain.eval.report import load_metrics

    groups: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]] = {}
    for cell in study.cells:
        copy = cell.report_copy
        out = copy.parent.parent  # the folder of the cells compared together
        run_metrics = cell.output_dir / "metrics.json"
        if run_metrics.is_file() and copy.resolve() != run_metrics.resolve():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_metrics, copy)
        if copy.is_file():
            name = str(cell.point.get("variant", cell.label.rsplit("_s", 1)[0]))
            runs = groups.setdefault(str(out), {})
            runs.setdefault(name, []).append((str(copy.parent), load_metrics(copy.parent)))
    if not groups:
        print(f"no cell of the study has finished yet ({len(study.cells)} cells): nothing to report")
    for out, runs in groups.items():
        print(write_comparison(out, compare(runs)))
    return [Path(out) for out in groups]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="study spec YAML (see benchmarks/studies/)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="print the cells: index, status, output folder")
    what.add_argument("--cell", type=int, metavar="I", help="run cell I only (for a Slurm job array)")
    what.add_argument("--lanes", type=int, metavar="N", help="run every unfinished cell in N local processes")
    what.add_argument(
        "--report", action="store_true", help="compare the finished cells (mean and sd over seeds)"
    )


def main(args: argparse.Namespace) -> int:
    study = load_study(args.spec)
    if args.list:
        print(list_cells(study))
        return 0
    if args.cell is not None:
        run_cell(study, args.cell)
        return 0
    if args.report:
        for out in report(study):
            print(f"comparison: {out / 'comparison.md'}")
        return 0
    lanes = 1 if args.lanes is None else args.lanes
    if lanes < 1:
        raise ConfigError("--lanes must be at least 1", source="command line")
    return run_lanes(study, lanes, args.spec)
