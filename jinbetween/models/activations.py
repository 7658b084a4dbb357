"""Exact GELU and the GEGLU gate, computed in float32 (shared by the layers and the fused GEGLU kernel)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _gelu_erf_f32(x: jax.Array) -> jax.Array:
    """Exact GELU of `x` in float32, x·(1 + erf(x/√2))/2: torch's formula. (`jax.nn.gelu` goes through erfc,
    which XLA evaluates with both of its branches, an exp and a division per element: 2x the ALU work of erf.)"""
    x32 = x.astype(jnp.float32)
    return 0.5 * x32 * (1 + jax.lax.erf(x32 * np.float32(1 / math.sqrt(2))))


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU in float32, returned in `x`'s dtype."""
    return _gelu_erf_f32(x).astype(x.dtype)


def geglu_gate(projected: jax.Array) -> jax.Array:
    """value · gelu_erf(gate) of a GEGLU projection split as [value | gate], the product in float32, returned in
    the projection's dtype."""
    value, gate = jnp.split(projected, 2, axis=-1)
    return (value.astype(jnp.float32) * _gelu_erf_f32(gate)).astype(value.dtype)
