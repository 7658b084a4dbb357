"""FLOPs of a JAX function, counted from its jaxpr: matrix products and convolutions, 2 FLOPs per multiply-add.

The count is the work the program asks for, independent of the backend and of the kernels XLA picks:
the same rule as PyTorch's `torch.utils.flop_counter.FlopCounterMode` (GEMMs, batched GEMMs, convolutions;
normalizations and elementwise ops are not counted), so achieved TFLOP/s of two implementations compare.
Loops count their trip count (`scan` length, `lax.map`); a `while` loop, whose trip count is data, counts
one iteration and is reported in `FlopCount.while_loops`; a `cond` counts its most expensive branch and is
reported in `FlopCount.conds` (either makes the total a bound, not an exact count). Attention computed by a
fused kernel (cuDNN) is one opaque primitive: count a model with the XLA attention kernel, which does the same
products.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Callable

import jax
from jax.extend import core as jex_core


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs by primitive (`dot_general`, `conv_general_dilated`), and how many data-dependent loops and branches
    were met (counted as one iteration and as their most expensive branch)."""

    by_primitive: dict[str, float]
    while_loops: int = 0
    conds: int = 0

    @property
    def exact(self) -> bool:
        """True when no data-dependent loop or branch was met: the count is the program's work, not a bound."""
        return not (self.while_loops or self.conds)

    @property
    def total(self) -> float:
        return float(sum(self.by_primitive.values()))


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_flops(eqn) -> float:
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) axis indices
    kernel = eqn.invars[1].aval.shape
    per_output = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


_RULES: dict[str, Callable[[Any], float]] = {"dot_general": _dot_flops, "conv_general_dilated": _conv_flops}


def _subjaxprs(value) -> list:
    """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for item in value for j in _subjaxprs(item)]
    return []


def _count(jaxpr, totals: Counter, scale: float, met: Counter) -> None:
    """Adds `scale` × the FLOPs of `jaxpr` to `totals`, and the `while` and `cond` primitives met to `met`."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _RULES:
            totals[name] += scale * _RULES[name](eqn)
            continue
        if name == "cond":  # one branch runs: count the most expensive
            met["cond"] += 1
            branch_totals = []
            for branch in eqn.params["branches"]:
                sub = Counter()
                _count(branch.jaxpr, sub, scale, met)
                branch_totals.append(sub)
            totals.update(max(branch_totals, key=lambda c: sum(c.values())))
            continue
        inner_scale = scale * eqn.params["length"] if name == "scan" else scale
        met["while"] += name == "while"
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                _count(sub, totals, inner_scale, met)


def count_flops(fn: Callable, *args, **kwargs) -> FlopCount:
    """Returns the FLOPs of `fn(*args, **kwargs)`, traced (not run): arrays or `jax.ShapeDtypeStruct`s.

    For a jitted function with static arguments, pass them as keywords through `functools.partial`.
    """
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs)
    totals, met = Counter(), Counter()
    _count(jaxpr.jaxpr, totals, 1.0, met)
    return FlopCount(dict(totals), while_loops=met["while"], conds=met["cond"])
