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
        tensors: dict[str, torch.Tensor] = {}
        keys = sorted(self.rows[0]) if self.rows else []
        for key in keys:
            tensors[key] = torch.tensor([v for row in self.rows for v in row[key]], dtype=torch.long)
            tensors[f"{key}.lengths"] = torch.tensor([len(row[key]) for row in self.rows], dtype=torch.long)
        meta = {
            "capacity": self.capacity,
            "num_seen": self.num_seen,
            "keys": keys,
            "rng": _rng_to_json(self.rng.getstate()),
        }
        if not tensors:  # safetensors needs at least one tensor
            tensors["empty"] = torch.zeros(0, dtype=torch.long)
        atomic_write_bytes(path, save(tensors, metadata={"retain_buffer": json.dumps(meta)}))

    def load(self, path: str | Path) -> None:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["retain_buffer"])
        tensors = load_file(str(path))
        rows: list[dict[str, list[int]]] = []
        for key in meta["keys"]:
            flat = tensors[key].tolist()
            lengths = tensors[f"{key}.lengths"].tolist()
            if not rows:
                rows = [{} for _ in lengths]
            start = 0
            for row, length in zip(rows, lengths, strict=True):
                row[key] = flat[start : start + length]
                start += length
        self.capacity = meta["capacity"]
        self.num_seen = meta["num_seen"]
        self.rows = rows
        self.rng.setstate(_rng_from_json(meta["rng"]))


def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
