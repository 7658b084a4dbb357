"""Outputs written atomically: into a temporary sibling, then renamed onto the final name (`os.replace`).

An interrupted run leaves the previous output or none under the final name, never a half-written one; what it
leaves is a hidden `.NAME.partial-PID-…` sibling, removed by the next write of the same output once process PID is
gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

_PARTIAL = ".partial-"


def _sibling(path: Path, kind: str) -> Path:
    """Returns a fresh hidden path beside `path` that ends like it (writers pick the format by the extension)."""
    return path.with_name(f".{path.name}{kind}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale(path: Path) -> None:
    """Removes the temporary siblings that interrupted writes of `path` left (their process is gone)."""
    if not path.parent.is_dir():
        return
    for leftover in path.parent.glob(glob.escape(f".{path.name}{_PARTIAL}") + "*"):
        pid = leftover.name[len(f".{path.name}{_PARTIAL}"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            _remove(leftover)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file path beside `path`, with the same extension, to write the output to; when the block
    ends normally the file is synced and renamed onto `path` (replacing it), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    temporary = _sibling(path, _PARTIAL)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path` to write the output folder in; when the block ends normally it
    takes the place of `path` (an existing folder there is removed), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    temporary = _sibling(path, _PARTIAL)
    temporary.mkdir()
    try:
        yield temporary
        if path.exists():
            # Two renames: between them the output is absent, which an interrupted run may leave, never a mix.
            previous = _sibling(path, _PARTIAL)
            os.replace(path, previous)
            os.replace(temporary, path)
            _remove(previous)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            _remove(temporary)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` atomically; returns `path`."""
    with replacing(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, record: Any) -> Path:
    """Writes `record` as indented JSON to `path` atomically; returns `path`."""
    return write_text(path, json.dumps(record, indent=2) + "\n")
