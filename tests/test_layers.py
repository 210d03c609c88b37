"""The one-way import rule of docs/architecture.md, checked on every module's import statements.

config <- method interface <- methods <- training <- CLI/API: a module may import its own layer and
the layers below it, never one above (lazy imports inside functions count too).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: (rank, layer, module prefixes). A module belongs to the layer of its longest matching prefix;
#: a prefix ending in "=" matches that module exactly.
LAYERS = [
    (0, "foundation", ["retain.errors", "retain.io"]),
    (1, "config", ["retain.hparams"]),
    (2, "data and models", ["retain.data", "retain.model"]),
    (
        3,
        "method interface",
        ["retain.cl=", "retain.cl.base", "retain.cl.registry", "retain.cl.loss", "retain.eval"],
    ),
    (4, "methods", ["retain.cl."]),
    (5, "training", ["retain.training", "retain.bench", "retain.cl.ilora.ilora_trainer"]),
    (
        6,
        "CLI and API",
        [
            "retain=",
            "retain.__main__",
            "retain.cli",
            "retain.api",
            "retain.workflow",
            "retain.study",
            "retain.export",
            "retain.cl.ilora.ilora_workflow",
        ],
    ),
]


def layer_of(module: str) -> tuple[int, str]:
    best = (-1, -1, "")
    for rank, name, prefixes in LAYERS:
        for prefix in prefixes:
            exact = prefix.endswith("=")
            stem = prefix.rstrip("=")
            if module == stem or (
                not exact and (module.startswith(stem) and (stem.endswith(".") or module[len(stem)] == "."))
            ):
                if len(stem) > best[0]:
                    best = (len(stem), rank, name)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1], best[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: use absolute imports"
            names.append(node.module or "")
    return [n for n in names if n == "retain" or n.startswith("retain.")]


def test_layer_map_matches_the_rule():
    assert layer_of("retain.cl.seq.method")[1] == "methods"
    assert layer_of("retain.cl")[1] == "method interface"
    assert layer_of("retain.cl.loss")[1] == "method interface"
    assert layer_of("retain.training.sequence")[1] == "training"
    assert layer_of("retain")[1] == "CLI and API"
    assert layer_of("retain.cli")[1] == "CLI and API"


def test_imports_run_one_way():
    violations = []
    files = sorted(SRC.glob("retain/**/*.py"))
    assert len(files) > 40
    for path in files:
        own = module_name(path)
        rank, layer = layer_of(own)
        for target in imported_modules(path):
            target_rank, target_layer = layer_of(target)
            if target_rank > rank:
                violations.append(f"{own} ({layer}) imports {target} ({target_layer})")
    assert not violations, "\n".join(violations)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["keys", "ilora"], ["keys"]])
def test_help_methods_and_keys_import_no_torch(argv):
    code = (
        "import sys, contextlib, io\n"
        "from retain.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main({argv!r})\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"`retain {' '.join(argv)}` imported {result.stdout.strip()}"


def test_parsing_a_config_imports_no_method_code():
    code = (
        "import sys\n"
        "from retain.cl.registry import method_specs, parse_config\n"
        "config = parse_config({'model_name_or_path': 'x', 'cl_tasks': 'a', 'cl_method': 'ilora', 'ema_alpha': 0.5})\n"
        "assert config.method_args.ema_alpha == 0.5\n"
        "modules = {spec.implementation.split(':')[0] for spec in method_specs().values()}\n"
        "print(','.join(sorted(m for m in modules if m in sys.modules)))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"parsing imported {result.stdout.strip()}"
