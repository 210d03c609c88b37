"""Pseudo-row files and the rehearsal state saved with each task.

`<output_dir>/pseudo/` is a dataset folder a user can read or train on: `<name>.json` (alpaca rows),
`dataset_info.json` registering each file, and `summary.json` with, per file, the counts of generated,
malformed, duplicate and kept rows, the generation time in seconds and a fingerprint of what produced
the rows (settings and adapter weights): a resumed run reuses a file whose fingerprint matches instead
of generating again. Only the main process writes; every process reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from retain.errors import ModelError
from retain.io import atomic_write_json

logger = logging.getLogger(__name__)

PSEUDO_DIR = "pseudo"
SUMMARY_FILE = "summary.json"
DATASET_INFO = "dataset_info.json"
#: The method state in each task directory (JSON: rows of text and counts, no tensors).
STATE_FILE = "rehearsal_state.json"
STATE_FORMAT = 1


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class PseudoFiles:
    """The pseudo folder of a run, and optionally a second folder every file is copied to (EasyCL's
    `pseudo_samples_dir` / `lamol_samples_dir`)."""

    def __init__(self, output_dir: str | Path, copy_dir: str | Path | None = None):
        self.folder = Path(output_dir) / PSEUDO_DIR
        self.copy_dir = Path(copy_dir) if copy_dir else None

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def summary(self) -> dict[str, Any]:
        data = _read_json(self.folder / SUMMARY_FILE)
        return data if isinstance(data, dict) else {}

    def load_if_current(
        self, name: str, fingerprint: str
    ) -> tuple[list[dict[str, str]], dict[str, Any]] | None:
        """The rows and summary entry of `name` when they were made by the same settings and weights."""
        entry = self.summary().get(name)
        rows = _read_json(self.path(name))
        if (
            not isinstance(entry, dict)
            or entry.get("fingerprint") != fingerprint
            or not isinstance(rows, list)
        ):
            return None
        return rows, entry

    def write(self, name: str, rows: list[dict[str, str]], entry: dict[str, Any]) -> None:
        """Write the rows, then their summary entry (a file is reused only once both are in place)."""
        folders = [self.folder] + ([self.copy_dir] if self.copy_dir else [])
        for folder in folders:
            atomic_write_json(folder / f"{name}.json", rows)
            info = _read_json(folder / DATASET_INFO)
            info = info if isinstance(info, dict) else {}
            info[name] = {"file_name": f"{name}.json", "formatting": "alpaca"}
            atomic_write_json(folder / DATASET_INFO, info)
        summary = self.summary()
        summary[name] = entry
        atomic_write_json(self.folder / SUMMARY_FILE, summary)


def save_state(directory: Path, method: str, state: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / STATE_FILE, {"format": STATE_FORMAT, "method": method, **state})


def load_state(directory: Path, method: str) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise ModelError(
            f"{method} state not found (not a task directory of a {method} run?)", source=str(path)
        )
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise ModelError(f"unreadable or unknown {method} state", source=str(path))
    if data.get("method") != method:
        raise ModelError(f"the state was saved by '{data.get('method')}', not '{method}'", source=str(path))
    return data
