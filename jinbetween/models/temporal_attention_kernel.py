"""The core of temporal self-attention as one GPU kernel per call (Pallas, Triton back-end).

SVD's temporal attention runs one short sequence per pixel: 25 frames, head dim 64, and B·h·w·heads sequences
(92 160 per layer at level 0 of a guided call). XLA turns it into two batched matmuls that need the heads moved in
front of the frames, so around them it transposes the queries, keys, values and output, materializes the float32
logits and the probabilities, and runs the softmax as its own pass, several times the memory traffic of reading q,
k, v and writing the output once (bench/NOTES.md, "Measurements behind the code": the default on Hopper GPUs).

Here one program takes one (sequence, head): it reads that head's `[F, D]` slices of q, k and v where the
projections wrote them (`[N, F, heads·D]`, no transposes), computes the `[F, F]` logits, the softmax and the
output in registers, and writes the output (and, when GI captures maps, the probabilities). GI's other direction
uses `apply_probs`: given probabilities, it reads them with v. Frames are padded in registers to a power of two
(Triton's tiles) and masked.

Arithmetic follows the XLA path (`attend_reference` and friends, which `TemporalSelfAttention` uses otherwise):
logits in float32 from the activation dtype, softmax in float32, the probabilities rounded to the activation dtype
before they multiply v. Gradients recompute the XLA path (`jax.custom_vjp`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Triton's warps per program: a program's tiles are tiny ([32, 64] at 25 frames), so two warps keep many programs
# resident per SM (1, 2 and 4 were within a few percent of each other on an H200).
NUM_WARPS = 2
MAX_FRAMES = 128
_MIN_TILE = 16  # the smallest side Triton's dot takes


def fits(frames: int, head_dim: int) -> bool:
    """Whether the kernel takes sequences of `frames` frames with heads of `head_dim` channels."""
    return 0 < frames <= MAX_FRAMES and head_dim >= _MIN_TILE and head_dim & (head_dim - 1) == 0


def _frame_tile(frames: int) -> int:
    return max(_MIN_TILE, 1 << (frames - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# The XLA path: q, k, v `[N, F, heads·D]`, probabilities `[N, heads, F, F]`.


def _split(x: jax.Array, heads: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def probs_reference(q: jax.Array, k: jax.Array, heads: int) -> jax.Array:
    """softmax(q·kᵀ/√D) per head, `[N, heads, F, F]` in float32."""
    q, k = _split(q, heads), _split(k, heads)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1)


def apply_probs_reference(probs: jax.Array, v: jax.Array) -> jax.Array:
    """P·v per head for `probs [N, heads, F, F]`, `v [N, F, heads·D]`: `[N, F, heads·D]` in v's dtype, P rounded
    to v's dtype first."""
    out = jnp.einsum("nhqk,nkhd->nqhd", probs.astype(v.dtype), _split(v, probs.shape[1]))
    return out.reshape(v.shape)


def attend_reference(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    return apply_probs_reference(probs_reference(q, k, heads), v)


def attend_capture_reference(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> tuple[jax.Array, jax.Array]:
    """(output, probabilities in the activation dtype)."""
    probs = probs_reference(q, k, heads)
    return apply_probs_reference(probs, v), probs.astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# The kernel.


def _program(*refs, frames: int, head_dim: int, mode: str):
    """One (head, sequence): refs are the sequence's `[F, heads·D]` rows (and `[F, F]` map) then the outputs."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    tile = _frame_tile(frames)
    rows = jnp.arange(tile)
    valid = rows < frames
    channels = pl.program_id(0) * head_dim + jnp.arange(head_dim)
    head_slice = (rows[:, None], channels[None, :])
    map_slice = (rows[:, None], rows[None, :])
    map_valid = valid[:, None] & valid[None, :]

    def load(ref):
        return plgpu.load(ref.at[head_slice], mask=valid[:, None], other=0)

    if mode == "apply":
        probs_ref, v_ref, out_ref = refs
        probs = plgpu.load(probs_ref.at[map_slice], mask=map_valid, other=0)
    else:
        q_ref, k_ref, v_ref, out_ref, *probs_out = refs
        logits = jnp.dot(load(q_ref), load(k_ref).T, preferred_element_type=jnp.float32)
        logits = jnp.where(valid[None, :], logits * (head_dim ** -0.5), -jnp.inf)
        shifted = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
        probs = shifted / jnp.sum(shifted, axis=1, keepdims=True)
        if probs_out:
            plgpu.store(probs_out[0].at[map_slice], probs.astype(probs_out[0].dtype), mask=map_valid)
    # Padded rows of v load as zeros, and padded columns of the probabilities are zero (masked or -inf logits).
    out = jnp.dot(probs.astype(v_ref.dtype), load(v_ref), preferred_element_type=jnp.float32)
    plgpu.store(out_ref.at[head_slice], out.astype(out_ref.dtype), mask=valid[:, None])


def _call(mode: str, heads: int, interpret: bool, *arrays: jax.Array):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    v = arrays[-1] if mode == "apply" else arrays[2]
    n, frames, channels = v.shape
    rows = pl.BlockSpec((None, frames, channels), lambda h, i: (i, 0, 0))
    maps = pl.BlockSpec((None, None, frames, frames), lambda h, i: (i, h, 0, 0))
    out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [rows]
    if mode == "capture":
        out_shape.append(jax.ShapeDtypeStruct((n, heads, frames, frames), v.dtype))
        out_specs.append(maps)
    # Heads first: Triton launches grid axis 0 fastest, so a sequence's heads run together and share its rows in L2.
    return pl.pallas_call(
        functools.partial(_program, frames=frames, head_dim=channels // heads, mode=mode),
        grid=(heads, n),
        in_specs=[maps, rows] if mode == "apply" else [rows, rows, rows],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name=f"pallas_temporal_attention_{mode}",
    )(*arrays)


def _check(v: jax.Array, heads: int) -> None:
    if v.ndim != 3 or v.shape[-1] % heads or not fits(v.shape[1], v.shape[-1] // heads):
        raise ValueError(f"the temporal attention kernel takes [N, F, heads·D] with F ≤ {MAX_FRAMES} and D a power "
                         f"of two ≥ {_MIN_TILE}; got {v.shape} with {heads} heads (check `fits` first).")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, interpret: bool = False) -> jax.Array:
    """softmax(q·kᵀ/√D)·v per head and sequence, for q, k, v `[N, F, heads·D]`, as one kernel.

    `interpret=True` runs the program with XLA ops on any backend (a test of its arithmetic, slow); otherwise it
    compiles for an NVIDIA GPU through Triton. Check `fits` first.
    """
    _check(v, heads)
    return _call("attend", heads, interpret, q, k, v)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attend_capture(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, interpret: bool = False,
                   ) -> tuple[jax.Array, jax.Array]:
    """`attend`, also returning the probabilities `[N, heads, F, F]` in the activation dtype (GI's captured maps)."""
    _check(v, heads)
    out, probs = _call("capture", heads, interpret, q, k, v)
    return out, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def apply_probs(probs: jax.Array, v: jax.Array, interpret: bool = False) -> jax.Array:
    """P·v per head for given probabilities `probs [N, heads, F, F]` and `v [N, F, heads·D]` (GI's injected maps)."""
    _check(v, probs.shape[1])
    n, frames = v.shape[:2]
    if probs.shape != (n, probs.shape[1], frames, frames):
        raise ValueError(f"probabilities of shape {probs.shape} do not match v {v.shape}: expected "
                         f"[{n}, heads, {frames}, {frames}].")
    return _call("apply", probs.shape[1], interpret, probs, v)[0]


# Gradients: forward through the kernel, backward through the XLA path's VJP.


def _attend_forward(q, k, v, heads, interpret):
    return attend(q, k, v, heads, interpret), (q, k, v)


def _attend_backward(heads, interpret, residuals, cotangent):
    return jax.vjp(functools.partial(attend_reference, heads=heads), *residuals)[1](cotangent)


def _capture_forward(q, k, v, heads, interpret):
    return attend_capture(q, k, v, heads, interpret), (q, k, v)


def _capture_backward(heads, interpret, residuals, cotangents):
    return jax.vjp(functools.partial(attend_capture_reference, heads=heads), *residuals)[1](cotangents)


def _apply_forward(probs, v, interpret):
    return apply_probs(probs, v, interpret), (probs, v)


def _apply_backward(interpret, residuals, cotangent):
    return jax.vjp(apply_probs_reference, *residuals)[1](cotangent)


attend.defvjp(_attend_forward, _attend_backward)
attend_capture.defvjp(_capture_forward, _capture_backward)
apply_probs.defvjp(_apply_forward, _apply_backward)
