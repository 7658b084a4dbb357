"""ModelState: an NNX module as a jit-able pytree — its graph static, its arrays traced."""

from __future__ import annotations

import dataclasses
from typing import Generic, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelState(Generic[M]):
    """`nnx.split(module)` as one pytree, so that pure functions take models like any other argument.

    Inside `jax.jit` the graph is part of the cache key and `merge()` rebuilds the module at trace time.
    """

    graphdef: nnx.GraphDef = dataclasses.field(metadata=dict(static=True))
    state: nnx.State

    @classmethod
    def of(cls, module: M) -> "ModelState[M]":
        return cls(*nnx.split(module))

    def merge(self) -> M:
        return nnx.merge(self.graphdef, self.state)
