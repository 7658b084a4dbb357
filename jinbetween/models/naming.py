"""Parameter naming of the models: torch state-dict key <-> NNX path, and the torch <-> NNX tensor layouts.

A torch key `a.0.b.weight` is the NNX path `('a', 0, 'b', kernel|scale|embedding)`; Linear weights are
transposed, conv weights go OIHW -> HWIO (OIDHW -> DHWIO). The storage layer (`jinbetween.weights`) reads and
writes torch-named tensors through these functions only.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Path_ = tuple[str | int, ...]
_LEAF_FROM_TORCH_WEIGHT = ("kernel", "scale", "embedding")
_KERNEL_PERMUTATIONS = {2: (1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}


def torch_key(path: Path_) -> str:
    """Returns the torch state-dict name of an NNX parameter path."""
    *parents, leaf = (str(p) for p in path)
    return ".".join(parents + ["weight" if leaf in _LEAF_FROM_TORCH_WEIGHT else leaf])


def to_nnx_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Returns a torch-layout parameter in the NNX layout of its `leaf` (kernels permuted, others unchanged)."""
    if leaf == "kernel" and array.ndim in _KERNEL_PERMUTATIONS:
        return np.ascontiguousarray(array.transpose(_KERNEL_PERMUTATIONS[array.ndim]))
    return array


def torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """Returns the torch shape whose NNX layout is `shape` (inverse of `to_nnx_layout`)."""
    if leaf == "kernel" and len(shape) in _KERNEL_PERMUTATIONS:
        perm = _KERNEL_PERMUTATIONS[len(shape)]
        return tuple(shape[perm.index(i)] for i in range(len(shape)))
    return tuple(shape)


def flat_params(module: nnx.Module) -> dict[Path_, jax.ShapeDtypeStruct]:
    """Returns {NNX path: value} of every nnx.Param of a (possibly abstract) module."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Returns an NNX-layout parameter in torch's layout (inverse of `to_nnx_layout`)."""
    if leaf == "kernel" and array.ndim in _KERNEL_PERMUTATIONS:
        return np.ascontiguousarray(array.transpose(np.argsort(_KERNEL_PERMUTATIONS[array.ndim])))
    return array


def merge_params(module_abstract: nnx.Module, params: Mapping[Path_, Any]) -> nnx.Module:
    """Returns a concrete module: the abstract module's graph with `params` (a complete {path: array})."""
    graphdef, state = nnx.split(module_abstract)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(params[path]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


