"""Argument checks run before any work: numbers in range, choices, and outputs that can be written.

Each returns the checked value or raises ArgumentError with a one-line message that names the argument, what is
wrong and the fix. `name` is how the caller spells the argument: a command-line option (`--steps`, shown as
`--steps 0`) or a Python keyword (`num_inference_steps`, shown as `num_inference_steps=0`).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, NoReturn, Sequence

from jinbetween.errors import ArgumentError

VIDEO_SUFFIXES = (".mp4", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits of a seed: larger or negative seeds would repeat smaller ones


def shown(name: str, value: Any) -> str:
    """Returns how the caller wrote the argument: `--steps 0` for an option, `num_steps=0` for a keyword."""
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    return f"{name} {value}" if name.startswith("-") else f"{name}={value!r}"


def refuse(name: str, value: Any, problem: str, fix: str) -> NoReturn:
    """Raises ArgumentError: `NAME VALUE: problem; fix.`"""
    raise ArgumentError(f"{shown(name, value)}: {problem}; {fix}.")


def _bounds(minimum, maximum, above) -> str:
    text = lambda bound: str(bound) if isinstance(bound, numbers.Integral) else f"{bound:g}"  # noqa: E731
    parts = [f"{sign} {text(bound)}" for sign, bound in ((">", above), ("≥", minimum), ("≤", maximum))
             if bound is not None]
    return " and ".join(parts)


def integer(value: Any, name: str, meaning: str, *, minimum: int | None = None, maximum: int | None = None,
            example: Any = None) -> int:
    """Returns `value` if it is an integer (not a bool) within [minimum, maximum]."""
    example = minimum if example is None else example
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        refuse(name, value, f"{meaning} must be a whole number", f"pass e.g. {shown(name, example)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        refuse(name, value, f"out of range, {meaning} must be {_bounds(minimum, maximum, None)}",
               f"pass e.g. {shown(name, example)}")
    return int(value)


def number(value: Any, name: str, meaning: str, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, example: Any = None) -> float:
    """Returns `value` as a float if it is a finite real number (not a bool) within the bounds (`above`: strictly)."""
    example = example if example is not None else minimum if minimum is not None else above
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        refuse(name, value, f"{meaning} must be a finite number", f"pass e.g. {shown(name, example)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum) or \
            (above is not None and value <= above):
        refuse(name, value, f"out of range, {meaning} must be {_bounds(minimum, maximum, above)}",
               f"pass e.g. {shown(name, example)}")
    return float(value)


def boolean(value: Any, name: str, meaning: str) -> bool:
    """Returns `value` if it is a bool."""
    if not isinstance(value, bool):
        refuse(name, value, f"{meaning} must be true or false", f"pass {shown(name, True)} or {shown(name, False)}")
    return value


def choice(value: Any, name: str, choices: Sequence[Any], meaning: str) -> Any:
    """Returns `value` if it is one of `choices`."""
    if value not in choices:
        refuse(name, value, f"{meaning} must be one of {', '.join(map(repr, choices))}",
               f"pass e.g. {shown(name, choices[0])}")
    return value


def seed(value: Any, name: str = "--seed") -> int:
    """Returns `value` if it is a seed that jax.random.key keeps whole: an integer in 0..2³²−1."""
    return integer(value, name, "a seed", minimum=0, maximum=MAX_SEED, example=0)


def _creatable(path: Path, name: str) -> None:
    """Raises ArgumentError unless `path` can be created or written: its nearest existing ancestor is a writable
    folder (and `path` itself, if it exists, is writable)."""
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if ancestor != path.absolute() and not ancestor.is_dir():
        refuse(name, path, f"{ancestor} is a file, so nothing can be written under it",
               "choose a path inside a folder")
    folder = ancestor if ancestor.is_dir() else ancestor.parent
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        refuse(name, path, f"cannot write to {folder} (permission denied)", "choose a writable location")


def output_file(path: str | os.PathLike, name: str, suffixes: Sequence[str], meaning: str) -> Path:
    """Returns `path` if a `meaning` file with one of `suffixes` can be written there (nothing is created)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        refuse(name, path, f"{meaning} must be a {' or '.join(suffixes)} file",
               f"pass e.g. {shown(name, path.with_suffix(suffixes[0]) if path.name else 'out' + suffixes[0])}")
    if path.is_dir():
        refuse(name, path, "is a folder", f"pass a file name, e.g. {shown(name, path / ('out' + suffixes[0]))}")
    _creatable(path, name)
    return path


def output_dir(path: str | os.PathLike, name: str) -> Path:
    """Returns `path` if a folder can be written there: absent and creatable, or a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        refuse(name, path, "is a file, not a folder", "pass a folder (it is created if absent)")
    _creatable(path, name)
    return path


def input_path(path: str | os.PathLike, name: str, meaning: str, *, folder: bool | None = None) -> Path:
    """Returns `path` if it exists (and is a folder, or a file, when `folder` says so)."""
    path = Path(path)
    if not path.exists():
        refuse(name, path, f"{meaning} does not exist", "check the path")
    if folder is True and not path.is_dir():
        refuse(name, path, f"{meaning} must be a folder, this is a file", "pass its folder")
    if folder is False and not path.is_file():
        refuse(name, path, f"{meaning} must be a file, this is a folder", "pass a file in it")
    return path
