"""Weight files checked against the sha256 hashes recorded beside them.

Three kinds of folder record hashes as `{relative path: sha256}`: a converted dir (`manifest.json`, key "files",
written by `jinbetween convert`), a release such as the shipped toy-world model (`release.json`, key "files") and a
GI backward delta (`delta.json`, key "sha256"; its "files" are those of the UNet it was converted from). Hashing a
converted SVD-XT takes seconds, so loads keep the hashes they computed in a cache keyed by
path, size and modification time (`~/.cache/jinbetween/sha256.json`; `$JINBETWEEN_HASH_CACHE` names another file or
`off`): later loads re-hash only files that changed. `verify_folder(..., use_cache=False)` (`jinbetween verify`)
re-hashes everything, which also finds damage that left the size and time alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

from jinbetween import atomic
from jinbetween.errors import IntegrityError, WeightsNotFoundError

CACHE_ENV = "JINBETWEEN_HASH_CACHE"
DEFAULT_CACHE = Path("~/.cache/jinbetween/sha256.json")
RECORDS = {"manifest.json": "files", "release.json": "files", "delta.json": "sha256"}  # record file: its key
# A file modified this recently may change again within the file system's timestamp resolution without its
# modification time changing: its hash is not cached (git's "racily clean" entries).
_FRESH_SECONDS = 2.0
_SHOWN = 3


def sha256_of(file: str | os.PathLike) -> str:
    """Returns the hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """Returns {name: sha256} of the files `folder/name`."""
    folder = Path(folder)
    return {name: sha256_of(folder / name) for name in names}


def cache_path() -> Path | None:
    """Returns the hash cache file, or None when `$JINBETWEEN_HASH_CACHE` is `off`."""
    setting = os.environ.get(CACHE_ENV)
    if setting is not None and setting.strip().lower() in ("off", "none", "0", "false"):
        return None
    return Path(setting or DEFAULT_CACHE).expanduser()


def _read_cache(path: Path | None) -> dict[str, list]:
    if path is None or not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache only costs re-hashing
    return entries if isinstance(entries, dict) else {}


def _stamp(file: Path) -> list[int]:
    stat = file.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def cached_hashes(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """Returns {name: sha256} of the files `folder/name`, taken from the hash cache for files whose size, modification
    time and inode are those recorded with the hash; the others are hashed and recorded."""
    folder, path = Path(folder), cache_path()
    cache = _read_cache(path)
    hashes, changed = {}, False
    for name in names:
        file = (folder / name).resolve()
        stamp = _stamp(file)
        entry = cache.get(str(file))
        if isinstance(entry, list) and entry[:-1] == stamp:
            hashes[name] = entry[-1]
            continue
        hashes[name] = sha256_of(file)
        if time.time() - stamp[1] / 1e9 > _FRESH_SECONDS:
            cache[str(file)], changed = [*stamp, hashes[name]], True
    if changed and path is not None:
        cache = {file: entry for file, entry in cache.items() if os.path.exists(file)}  # forget deleted files
        try:
            atomic.write_text(path, json.dumps(cache))
        except OSError:
            pass  # an unwritable cache only costs re-hashing next time
    return hashes


def recorded_hashes(folder: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """Returns (the record file, its {relative path: sha256}) of a folder that records hashes (see RECORDS)."""
    folder = Path(folder)
    for name, key in RECORDS.items():
        record = folder / name
        if record.is_file():
            try:
                files = json.loads(record.read_text()).get(key)
            except (OSError, ValueError, AttributeError) as err:
                raise IntegrityError(f"{record} is unreadable ({err}); convert or download the weights again.",
                                     [name]) from err
            if not isinstance(files, dict):
                raise WeightsNotFoundError(f"{record} records no file hashes (written by an older jinbetween); "
                                           "convert the weights again to record them.")
            return record, files
    raise WeightsNotFoundError(f"{folder} records no file hashes: it holds none of {', '.join(RECORDS)}; pass a "
                               "converted dir (made by jinbetween convert), a release or a backward delta.")


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def verify_files(folder: str | os.PathLike, expected: Mapping[str, str], *, what: str, fix: str,
                 use_cache: bool = True, unexpected: Iterable[str] = ()) -> None:
    """Raises IntegrityError naming the files of `expected` ({relative path: sha256}) that are missing under `folder`
    or whose bytes have another hash (and the `unexpected` files, if any); returns None when all match."""
    folder = Path(folder)
    missing = sorted(name for name in expected if not (folder / name).is_file())
    present = [name for name in expected if name not in missing]
    hashes = cached_hashes(folder, present) if use_cache else hash_files(folder, present)
    changed = sorted(name for name in present if hashes[name] != expected[name])
    unexpected = sorted(unexpected)
    if missing or changed or unexpected:
        problems = [f"{len(changed)} changed ({_shown(changed)})" if changed else "",
                    f"{len(missing)} missing ({_shown(missing)})" if missing else "",
                    f"{len(unexpected)} unexpected ({_shown(unexpected)})" if unexpected else ""]
        raise IntegrityError(f"{what} in {folder} do not match their recorded sha256: "
                             f"{'; '.join(p for p in problems if p)}; {fix}", [*changed, *missing, *unexpected])


def files_under(folder: str | os.PathLike, skip: Iterable[str] = RECORDS) -> list[str]:
    """Returns the relative paths of every file under `folder` but the hash records and atomic writes' leftovers."""
    folder, skip = Path(folder), set(skip)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in skip and not any(part.startswith(".") for part in
                                                                       p.relative_to(folder).parts))


def verify_folder(folder: str | os.PathLike, *, use_cache: bool = False) -> int:
    """Returns how many files of `folder` (a converted dir, release or delta) match the hashes it records, after
    checking that none is missing, changed or unlisted; raises IntegrityError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsNotFoundError(f"{folder} is not a folder; pass a converted weights dir, a release or a delta.")
    record, expected = recorded_hashes(folder)
    extra = [name for name in files_under(folder) if name not in expected]
    verify_files(folder, expected, what="the weight files", use_cache=use_cache, unexpected=extra,
                 fix=f"the folder changed since {record.name} was written: convert or download the weights again.")
    return len(expected)
