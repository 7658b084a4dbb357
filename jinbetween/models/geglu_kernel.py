"""GEGLU's projection and gate as one GPU kernel (Pallas, Triton back-end).

XLA runs a GEGLU as a matmul to `[M, 2·inner]` (value | gate) and then an elementwise pass that reads both halves
and writes `value · gelu(gate)` `[M, inner]`: the largest memory-bound pass of a UNet call (bench/NOTES.md,
"Measurements behind the code"). Here each program computes a `[bm, bn]` tile of the value and the gate
products side by side in float32, applies the gate in registers and writes only the `[M, inner]` result: the
projection's output shrinks by half and the gate pass disappears. Whether Triton's matmul keeps up with cuBLAS on
these shapes is the open question (`bench/geglu_kernel.py` times both).

The gate is computed in float32 from float32 accumulators, where XLA's path rounds the projection to the
activation dtype first; both round the product to it. Gradients recompute the XLA path (`jax.custom_vjp`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween.models.activations import geglu_gate

# Tile of one program: rows, output columns of each half, reduction step; Triton's warps and pipeline stages.
TILE_ROWS, TILE_COLS, TILE_DEPTH, NUM_WARPS, NUM_STAGES = 128, 64, 64, 4, 3


def geglu_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """XLA's GEGLU of rows `x [M, C]`: (x·W + b) split as [value | gate], value · gelu_erf(gate), in x's dtype."""
    return geglu_gate(x @ kernel.astype(x.dtype) + bias.astype(x.dtype))


def fits(rows: int, channels: int, inner: int) -> bool:
    """Whether the kernel's tiles divide a GEGLU of `rows` rows, `channels` inputs and `inner` outputs."""
    return rows % TILE_ROWS == 0 and channels % TILE_DEPTH == 0 and inner % TILE_COLS == 0


def _erf(x: jax.Array) -> jax.Array:
    """erf in float32 from exp and a rational polynomial (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7): Pallas'
    Triton lowering has no erf."""
    a = jnp.abs(x)
    t = 1.0 / (1.0 + np.float32(0.3275911) * a)
    poly = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (
        np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    magnitude = 1.0 - poly * jnp.exp(-a * a)
    return jnp.where(x < 0, -magnitude, magnitude)


def _tile(x_ref, value_w_ref, gate_w_ref, value_b_ref, gate_b_ref, out_ref, *, depth: int):
    """One `[bm, bn]` tile: the value and gate products over the input channels, then value · gelu(gate)."""
    from jax.experimental import pallas as pl

    rows, cols = out_ref.shape

    def step(k, accumulators):
        value, gate = accumulators
        chunk = pl.ds(k * TILE_DEPTH, TILE_DEPTH)
        a = x_ref[:, chunk]
        value += jnp.dot(a, value_w_ref[chunk, :], preferred_element_type=jnp.float32)
        gate += jnp.dot(a, gate_w_ref[chunk, :], preferred_element_type=jnp.float32)
        return value, gate

    zeros = jnp.zeros((rows, cols), jnp.float32)
    value, gate = jax.lax.fori_loop(0, depth // TILE_DEPTH, step, (zeros, zeros))
    value += value_b_ref[...].astype(jnp.float32)
    gate += gate_b_ref[...].astype(jnp.float32)
    gelu = 0.5 * gate * (1.0 + _erf(gate * np.float32(1 / math.sqrt(2))))
    out_ref[...] = (value * gelu).astype(out_ref.dtype)


def _fused(x: jax.Array, kernel: jax.Array, bias: jax.Array, interpret: bool) -> jax.Array:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, channels = x.shape
    inner = kernel.shape[1] // 2
    blocks = inner // TILE_COLS  # the gate's columns start `blocks` tiles after the value's
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype).reshape(1, -1)
    # Column tiles first: Triton launches grid axis 0 fastest, so the programs of one row tile run together and
    # read its rows of `x` from L2 rather than once per column tile from memory.
    return pl.pallas_call(
        functools.partial(_tile, depth=channels),
        grid=(blocks, rows // TILE_ROWS),
        in_specs=[pl.BlockSpec((TILE_ROWS, channels), lambda j, i: (i, 0)),
                  pl.BlockSpec((channels, TILE_COLS), lambda j, i: (0, j)),
                  pl.BlockSpec((channels, TILE_COLS), lambda j, i: (0, j + blocks)),
                  pl.BlockSpec((1, TILE_COLS), lambda j, i: (0, j)),
                  pl.BlockSpec((1, TILE_COLS), lambda j, i: (0, j + blocks))],
        out_specs=pl.BlockSpec((TILE_ROWS, TILE_COLS), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, inner), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="pallas_geglu",
    )(x, kernel, kernel, bias, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def geglu_fused(x: jax.Array, kernel: jax.Array, bias: jax.Array, interpret: bool = False) -> jax.Array:
    """GEGLU of rows `x [M, C]` with the projection `kernel [C, 2·inner]`, `bias [2·inner]`, as one kernel.

    The tiles must divide the shapes (`fits`). `interpret=True` runs the kernel's program with XLA ops on any
    backend (a test of its arithmetic, slow); otherwise it compiles for an NVIDIA GPU through Triton.
    """
    return _fused(x, kernel, bias, interpret)


def _forward(x, kernel, bias, interpret):
    return _fused(x, kernel, bias, interpret), (x, kernel, bias)


def _backward(interpret, residuals, cotangent):
    del interpret
    return jax.vjp(geglu_reference, *residuals)[1](cotangent)


geglu_fused.defvjp(_forward, _backward)
