"""Save and restore pytrees of arrays with orbax: the only module that imports orbax.

Trees are nested dicts with string keys (pure data, no class structure), so a checkpoint does not
depend on how the modules are written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


def save_tree(path: str | os.PathLike, tree: Any) -> None:
    """Writes `tree` to the directory `path` (replaced if it exists) and waits until it is on disk."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path).absolute(), tree, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def restore_tree(path: str | os.PathLike, abstract_tree: Any) -> Any:
    """Returns the tree at `path` with the structure, dtypes (cast on read) and shardings of `abstract_tree`."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(Path(path).absolute(), abstract_tree)
    finally:
        checkpointer.close()
