"""A persistent cache of compiled XLA programs: a program is compiled once per machine, not once per process.

Compiling GI's sampler, the keyframe encoding and the decode takes minutes of a first call (bench/NOTES.md); with
the cache, a later process with the same shapes, settings and software loads them instead. The CLI enables it;
notebooks and scripts call `enable()` before their first compilation.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jinbetween.errors import ConfigError

ENV = "JINBETWEEN_COMPILE_CACHE"
DEFAULT_DIR = Path("~/.cache/jinbetween/xla")
_OFF = ("off", "none", "0", "false")


def enable(setting: str | os.PathLike | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at a folder; returns it, or None when the cache stays off.

    `setting` is a folder or "off". Unset, it is taken from $JINBETWEEN_COMPILE_CACHE; unset there too, a cache
    folder the user gave JAX (`JAX_COMPILATION_CACHE_DIR`) stands, else `~/.cache/jinbetween/xla`. Call it before
    the first compilation: JAX settles its cache then.
    """
    setting = setting if setting is not None else os.environ.get(ENV)
    if setting is None and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if setting is not None and str(setting).strip().lower() in _OFF:
        return None
    folder = Path(setting if setting is not None else DEFAULT_DIR).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"Cannot create the compilation cache folder {folder} ({error}); pass --compile-cache with "
                          f"a writable folder, or --compile-cache off (or set {ENV}).") from error
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder
