"""A reservoir-sampling memory of variable-length encoded rows (shared by replay and I-LoRA)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from retain.data.prompt import pad_batch
from retain.io import atomic_write_bytes


class ReservoirBuffer:
    """Keeps a uniform sample of at most `capacity` of all rows ever offered (Vitter's algorithm R).

    After `n` offers, each offered row is in the buffer with probability `min(1, capacity / n)`.
    Rows are dicts of equal-length int lists (`input_ids`, `labels`, ...), stored unpadded.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.rows: list[dict[str, list[int]]] = []
        self.num_seen = 0
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: dict[str, list[int]]) -> None:
        if self.capacity == 0:
            self.num_seen += 1
            return
        if len(self.rows) < self.capacity:
            self.rows.append(row)
        else:
            slot = self.rng.randrange(self.num_seen + 1)
            if slot < self.capacity:
                self.rows[slot] = row
        self.num_seen += 1

    def add_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Offer every row of a padded batch, stripping padding with its attention mask."""
        mask = batch["attention_mask"].bool().cpu()
        keys = [k for k in ("input_ids", "labels") if k in batch]
        columns = {k: batch[k].detach().cpu() for k in keys}
        for i in range(mask.size(0)):
            self.add({k: columns[k][i][mask[i]].tolist() for k in keys})

    def sample(self, n: int, rng: random.Random | None = None) -> list[dict[str, list[int]]]:
        """`n` distinct rows drawn uniformly (all of them, shuffled, if `n` >= the size)."""
        rng = rng or self.rng
        return rng.sample(self.rows, min(n, len(self.rows)))

    def sample_batch(self, n: int, pad_id: int) -> dict[str, torch.Tensor] | None:
        rows = self.sample(n)
        return pad_batch(rows, pad_id, side="right") if rows else None

    # ---- persistence (safetensors: no pickle) -----------------------------------------------
    def save(self, path: str | Path) -> None:
        tensors, keys = rows_to_tensors(self.rows)
        meta = {
            "capacity": self.capacity,
            "num_seen": self.num_seen,
            "keys": keys,
            "rng": _rng_to_json(self.rng.getstate()),
        }
        _write(path, tensors, {"retain_buffer": json.dumps(meta)})

    def load(self, path: str | Path) -> None:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["retain_buffer"])
        self.rows = rows_from_tensors(load_file(str(path)), meta["keys"])
        self.capacity = meta["capacity"]
        self.num_seen = meta["num_seen"]
        self.rng.setstate(_rng_from_json(meta["rng"]))


Row = dict[str, list[int]]


def rows_to_tensors(rows: list[Row], prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Variable-length rows as flat tensors plus lengths (`{prefix}{key}`, `{prefix}{key}.lengths`)."""
    keys = sorted(rows[0]) if rows else []
    tensors = {}
    for key in keys:
        tensors[prefix + key] = torch.tensor([v for row in rows for v in row[key]], dtype=torch.long)
        tensors[f"{prefix}{key}.lengths"] = torch.tensor([len(row[key]) for row in rows], dtype=torch.long)
    return tensors, keys


def rows_from_tensors(tensors: dict[str, torch.Tensor], keys: list[str], prefix: str = "") -> list[Row]:
    rows: list[Row] = []
    for key in keys:
        flat = tensors[prefix + key].tolist()
        lengths = tensors[f"{prefix}{key}.lengths"].tolist()
        if not rows:
            rows = [{} for _ in lengths]
        start = 0
        for row, length in zip(rows, lengths, strict=True):
            row[key] = flat[start : start + length]
            start += length
    return rows


def save_row_groups(path: str | Path, groups: dict[str, list[Row]]) -> None:
    """Named lists of rows (for example one per task) in one safetensors file, written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    index = []
    for number, (name, rows) in enumerate(groups.items()):
        part, keys = rows_to_tensors(rows, prefix=f"{number}.")
        tensors.update(part)
        index.append({"name": name, "keys": keys, "rows": len(rows)})
    _write(path, tensors, {"retain_row_groups": json.dumps(index)})


def load_row_groups(path: str | Path) -> dict[str, list[Row]]:
    with safe_open(str(path), framework="pt") as handle:
        index = json.loads(handle.metadata()["retain_row_groups"])
    tensors = load_file(str(path))
    groups = {}
    for number, entry in enumerate(index):
        rows = rows_from_tensors(tensors, entry["keys"], prefix=f"{number}.")
        groups[entry["name"]] = rows if rows else [{} for _ in range(entry["rows"])]
    return groups


def _write(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    if not tensors:  # safetensors needs at least one tensor
        tensors = {"empty": torch.zeros(0, dtype=torch.long)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
