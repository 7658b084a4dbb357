"""The converted dir: its manifest (configs, sources, sha256 of every file), staged updates, component trees.

A converted dir holds `manifest.json` and one orbax checkpoint per component (`unet/`, ...), and may hold GI's
backward model as a weight delta (`gi_backward/`). A conversion writes into a staging copy that replaces the dir
whole when it is done, so an interrupted one leaves the dir as it was; loading checks the component's file hashes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from jinbetween import atomic, integrity
from jinbetween.checkpoint import save_tree
from jinbetween.errors import ConfigError, CorruptWeightsError
from jinbetween.integrity import sha256_of
from jinbetween.models.naming import Path_

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def nested(params: Mapping[Path_, Any]) -> dict[str, Any]:
    """{path: leaf} → nested dict with string keys (the checkpoint format)."""
    tree: dict[str, Any] = {}
    for path, leaf in params.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = leaf
    return tree


def flat_from_nested(tree: Mapping[str, Any], paths: Iterable[Path_]) -> dict[Path_, Any]:
    out = {}
    for path in paths:
        node = tree
        for part in path:
            node = node[str(part)]
        out[path] = node
    return out


def read_versioned_record(file: Path, version: int, fix: str) -> dict[str, Any]:
    """Returns the JSON object in `file`, checked to carry `"format_version": version`; raises CorruptWeightsError
    naming `file` and `fix` (what to do, e.g. "convert the weights again") if it is unreadable, not an object, or of
    another format version."""
    try:
        record = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptWeightsError(f"{file} is unreadable ({err}); {fix}.") from err
    found = record.get("format_version") if isinstance(record, dict) else None
    if found != version:
        raise CorruptWeightsError(f"{file} has format_version {found}, this jinbetween reads {version}; {fix}.")
    return record


def read_manifest(folder: Path) -> dict[str, Any]:
    """Returns the manifest of the converted dir `folder` (CorruptWeightsError if unreadable or of another version)."""
    return read_versioned_record(folder / MANIFEST, MANIFEST_VERSION, "convert the weights again")


def record_in_manifest(out_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Sets `name`'s entry in `out_dir/manifest.json` (created if absent), keeping the other entries."""
    manifest_file = out_dir / MANIFEST
    manifest = read_manifest(out_dir) if manifest_file.exists() else {"format_version": MANIFEST_VERSION,
                                                                       "components": {}}
    manifest["components"][name] = entry
    atomic.write_json(manifest_file, manifest)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Returns `out_dir` if a conversion may write there: absent, an empty folder, or a converted dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a folder for the converted weights.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise ConfigError(f"--out {out_dir} holds files but no {MANIFEST}, so it is not a converted dir; choose a new "
                          "folder (or a converted dir to add to).")
    return out_dir


@contextlib.contextmanager
def updating(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields a staging copy of the converted dir `out_dir` to change (hard links of its files; empty if it does not
    exist). When the block ends normally the sha256 of each of its files is recorded in its manifest and it replaces
    `out_dir` whole; otherwise it is removed, so an interrupted conversion leaves `out_dir` as it was."""
    out_dir = check_out_dir(out_dir)
    with atomic.replacing_dir(out_dir) as staging:
        if out_dir.exists():
            shutil.copytree(out_dir, staging, copy_function=_link_or_copy, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".*"))
        yield staging
        _record_file_hashes(staging, out_dir)


def _record_file_hashes(staging: Path, previous: Path) -> None:
    """Writes the sha256 of every file of the converted dir `staging` into its manifest; files still shared with the
    dir it replaces (`previous`) keep the hash recorded there."""
    manifest = read_manifest(staging)
    recorded = manifest.get("files", {})
    files = {}
    for name in integrity.files_under(staging, skip=(MANIFEST,)):
        shared = name in recorded and (previous / name).is_file() and os.path.samefile(staging / name, previous / name)
        files[name] = recorded[name] if shared else sha256_of(staging / name)
    manifest["files"] = files
    atomic.write_json(staging / MANIFEST, manifest)


def write_component(out_dir: Path, component: str, params: Mapping[Path_, np.ndarray], entry: dict[str, Any]) -> None:
    """Saves one component's parameters under `out_dir/component` (replacing it whole) and records it in the
    manifest; call inside `updating`."""
    with atomic.replacing_dir(out_dir / component) as folder:
        save_tree(folder, nested(params))
    record_in_manifest(out_dir, component, entry)


def verify_component(root: Path, component: str, model: str) -> None:
    """Raises IntegrityError unless the files of `root/component` match the sha256 recorded in `root`'s manifest
    (cached by size and modification time); a manifest without hashes (an older jinbetween's) is let through."""
    files = read_manifest(root).get("files")
    if files is None:
        log.warning("%s records no file hashes (converted by an older jinbetween), so %s is not verified; convert "
                    "it again to record them", root, component)
        return
    expected = {name: digest for name, digest in files.items() if name.startswith(f"{component}/")}
    if not expected:
        raise CorruptWeightsError(f"{root / MANIFEST} lists no files of {component}/; convert the weights again.")
    integrity.verify_files(root, expected, what=f"the {model} files",
                           fix="convert the weights again, or skip this check with --no-verify (verify=False)")

