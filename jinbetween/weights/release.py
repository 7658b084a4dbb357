"""The toy-world model shipped inside the package: where it is, and its release manifest (file hashes, training).

The weights model the toy world only (128×128 videos of falling, bouncing sprites): they are the default of the
CLI and `Pipeline` so that everything runs for real on any machine, not a substitute for SVD.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jinbetween import atomic, integrity
from jinbetween.errors import IntegrityError, WeightsNotFoundError
from jinbetween.integrity import sha256_of

WEIGHTS = Path(__file__).parents[1] / "toyworld" / "weights"
RELEASE = "release.json"
NOTE = ("A small SVD-architecture model trained by jinbetween on its procedural toy world (128x128, 14 frames): it "
        "models that world only. For real videos, convert SVD / SVD-XT weights (weights/README.md).")


def weight_files(folder: Path) -> list[Path]:
    """Returns every file of the release under `folder` except its manifest, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RELEASE)


def write_release(folder: str | os.PathLike, training: dict[str, Any]) -> Path:
    """Writes `folder/release.json`: the note, the sha256 of every file, and `training` (runs, losses, device)."""
    folder = Path(folder)
    manifest = {"note": NOTE, "files": {str(p.relative_to(folder)): sha256_of(p) for p in weight_files(folder)},
                "training": training}
    return atomic.write_json(folder / RELEASE, manifest)


def verify_release(folder: str | os.PathLike = WEIGHTS, *, use_cache: bool = True) -> dict[str, Any]:
    """Returns the release manifest of `folder` after checking that its files are exactly those listed, unchanged
    (their sha256; with `use_cache`, hashes cached by file size and modification time, `jinbetween.integrity`)."""
    folder = Path(folder)
    if not (folder / RELEASE).exists():
        raise WeightsNotFoundError(f"{folder} has no {RELEASE}: the toy-world weights are missing from this install; "
                                   "reinstall jinbetween (`pip install -e .` from a full clone).")
    try:
        manifest = json.loads((folder / RELEASE).read_text())
        listed = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{folder / RELEASE} is unreadable ({err}); reinstall jinbetween.", [RELEASE]) from err
    present = {str(p.relative_to(folder)) for p in weight_files(folder)}
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    names = sorted(set(listed) & present)
    hashes = integrity.cached_hashes(folder, names) if use_cache else integrity.hash_files(folder, names)
    changed = [name for name in names if hashes[name] != listed[name]]
    if missing or extra or changed:
        raise IntegrityError(f"The toy-world weights in {folder} do not match {RELEASE}: missing "
                             f"{missing or 'none'}, unexpected {extra or 'none'}, changed {changed or 'none'}; "
                             "reinstall jinbetween.", [*changed, *missing, *extra])
    return manifest


def default_weights() -> Path:
    """Returns the folder of the shipped toy-world pipeline (a diffusers SVD folder plus its GI backward delta)."""
    if not (WEIGHTS / "model_index.json").exists():
        raise WeightsNotFoundError(f"The toy-world weights are not in {WEIGHTS}; reinstall jinbetween from a full "
                                   "clone, or pass --weights.")
    return WEIGHTS
