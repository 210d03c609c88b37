"""Files on disk: atomic writes (a reader sees the old file or the new one, never a partial one) and the cache root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retain.errors import RetainError


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """retain's cache folder (converted models, built-in data, cached base rows): `override`, else
    `$RETAIN_CACHE`, else `~/.cache/retain`."""
    return Path(override or os.environ.get("RETAIN_CACHE") or Path.home() / ".cache" / "retain")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_writable_dir(
    path: Path, field: str, error: type[RetainError] = RetainError, source: str | None = None
) -> None:
    """Create folder `path` (with its parents) and check that a file can be written in it; else one
    line naming `field` of `source` (an existing file in its place, a read-only file system, no permission)."""
    if path.exists() and not path.is_dir():
        raise error(f"{path} is an existing file, not a folder", source=source, field=field)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise error(f"cannot write to {path}: {exc.strerror or exc}", source=source, field=field) from None


@contextlib.contextmanager
def exclusive_use(folder: Path, field: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` while the block runs: a second retain process that would write
    the same run is refused at once instead of mixing its files with the first's. The lock is on the
    folder itself (no lock file to leave behind), and the system drops it when the process ends, even
    by SIGKILL. Where folders cannot be locked (no fcntl, some network file systems), nothing is held."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        fcntl = None
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetainError(
                f"{folder} is in use by another retain process (a run writing there): "
                "wait for it to end, or choose another output_dir",
                field=field,
            ) from None
        except OSError:
            pass  # this file system does not lock folders
        yield
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` in one rename.

    An existing `path` is moved aside first and removed after the swap, so a kill
    leaves either the complete old directory, the complete new one, or both.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it the usual mode
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_error(exc: json.JSONDecodeError) -> str:
    """A JSON parse error as one phrase with its position: "Unterminated string starting at line 1, column 9".

    The decoder's own message may end in a dangling "at" (its position is kept apart); the position
    completes it.
    """
    return f"{exc.msg.removesuffix(' at')} at line {exc.lineno}, column {exc.colno}"
