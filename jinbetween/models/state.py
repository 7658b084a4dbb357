"""ModelState: an NNX module as a jit-able pytree — its graph static, its arrays traced."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Generic, TypeVar

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


def abstract(cls: type[M], config: Any) -> M:
    """Returns `cls(config)` with ShapeDtypeStructs for parameters (no weights allocated), a new module on each call.

    The construction is traced once per (class, config) and copied after that: tracing every layer's parameter
    draws takes seconds for a UNet (bench/NOTES.md), and a pipeline asks for its UNet's abstract twin more than once
    (the conversion target, the backward delta's layers).
    """
    return nnx.merge(*_traced(cls, config), copy=True)


@functools.lru_cache(maxsize=32)
def _traced(cls: type[M], config: Any) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
