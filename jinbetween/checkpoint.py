"""Save and restore pytrees of arrays with orbax: the only module that imports orbax.

Trees are nested dicts with string keys (pure data, no class structure), so a checkpoint does not
depend on how the modules are written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_tree(path: str | os.PathLike, tree: Any) -> None:
    """Writes `tree` to the directory `path` (replaced if it exists) and waits until it is on disk."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path).absolute(), tree, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def _placed_here(abstract_tree: Any) -> Any:
    """Gives each leaf of `abstract_tree` that has no sharding (e.g. from `jax.eval_shape`) this process's first
    device, so that a checkpoint written on another machine (a GPU run read on the CPU) restores instead of failing
    orbax's check that the saved devices exist here."""
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(leaf):
        if getattr(leaf, "sharding", None) is not None or not hasattr(leaf, "shape"):
            return leaf
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here)

    return jax.tree.map(place, abstract_tree)


def restore_tree(path: str | os.PathLike, abstract_tree: Any) -> Any:
    """Returns the tree at `path` with the structure, dtypes (cast on read) and shardings of `abstract_tree`; leaves
    without a sharding go to this process's first device, wherever the checkpoint was written."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(Path(path).absolute(), _placed_here(abstract_tree))
    finally:
        checkpointer.close()


class TrainingCheckpoints:
    """The numbered checkpoints of a training run in `directory` (orbax CheckpointManager), the last `keep` kept.

    Each holds a tree of arrays (nested dicts with string keys) and a JSON record (data position, run settings).
    Saves are synchronous: the training step donates its state buffers, so they must be on disk first. A save is
    written to a temporary folder and renamed when complete (orbax), so a run killed while saving leaves its last
    complete checkpoints (tests/test_faults.py kills one and resumes it); saving that step again replaces the
    leftover temporary folder.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Returns the newest saved step, or None if there is none."""
        return self._manager.latest_step()

    def save(self, step: int, tree: Any, record: dict) -> None:
        """Writes checkpoint `step`: `tree` and `record` (JSON-serializable), dropping the oldest beyond `keep`."""
        self._manager.save(step, args=ocp.args.Composite(tree=ocp.args.StandardSave(tree),
                                                         record=ocp.args.JsonSave(record)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_tree: Any) -> tuple[Any, dict]:
        """Returns (tree shaped like `abstract_tree`, record) of checkpoint `step`; leaves without a sharding go to
        this process's first device, wherever the checkpoint was written."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            tree=ocp.args.StandardRestore(_placed_here(abstract_tree)), record=ocp.args.JsonRestore()))
        return restored.tree, dict(restored.record)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "TrainingCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
