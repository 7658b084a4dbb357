"""Attention: a kernel registry, the diffusers `Attention` module, and temporal self-attention whose
probabilities can be captured or replaced (GI's rotated attention maps) through `AttnControl`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween import hardware
from jinbetween.errors import ConfigError, InputShapeError

log = logging.getLogger(__name__)

# Above this many bytes of float32 logits per call, the XLA kernel processes queries in chunks.
_LOGITS_BUDGET_BYTES = 1 << 30
_HALF_DTYPES = (jnp.bfloat16, jnp.float16)


# --------------------------------------------------------------------------------------------------
# Kernels: q [B, Lq, N, D], k/v [B, Lk, N, D] -> [B, Lq, N, D], softmax(q·kᵀ/√D)·v per head.


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1)
    return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)


def _query_chunk(batch: int, heads: int, kv_len: int) -> int:
    return max(1, _LOGITS_BUDGET_BYTES // (4 * batch * heads * kv_len))


def _xla_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """XLA attention over chunks of queries (`lax.map`), bounding the materialized logits."""
    b, lq, n, d = q.shape
    chunk = min(lq, _query_chunk(b, n, k.shape[1]))
    if chunk == lq:
        return _xla_attention(q, k, v)
    num_chunks = -(-lq // chunk)
    padded = jnp.pad(q, ((0, 0), (0, num_chunks * chunk - lq), (0, 0), (0, 0)))
    chunks = padded.reshape(b, num_chunks, chunk, n, d).swapaxes(0, 1)
    out = jax.lax.map(lambda qc: _xla_attention(qc, k, v), chunks)
    return out.swapaxes(0, 1).reshape(b, num_chunks * chunk, n, d)[:, :lq]


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


ATTENTION_KERNELS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "xla": _xla_attention,
    "xla_chunked": _xla_chunked_attention,
    "cudnn": _cudnn_attention,
}


def resolve_attention_impl(impl: str, dtype, head_dim: int) -> str:
    """Returns the concrete kernel name for `impl` ("auto" follows the backend, the GPU's generation and dtype)."""
    shape_ok = dtype in _HALF_DTYPES and head_dim % 8 == 0 and head_dim <= 256
    cudnn_ok = hardware.modern_gpu() and shape_ok
    if impl == "auto":
        if not cudnn_ok and shape_ok and jax.default_backend() == "gpu":
            hardware.note_old_gpu("XLA attention (cuDNN flash attention needs Ampere or newer)")
        return "cudnn" if cudnn_ok else "xla_chunked"
    if impl == "cudnn" and not cudnn_ok:
        raise ConfigError(
            f"attention_impl='cudnn' needs a GPU (Ampere or newer), bf16/fp16 activations and a head dim that is a "
            f"multiple of 8 and <= 256 (got backend {jax.default_backend()}, compute capability "
            f"{hardware.gpu_compute_capability()}, {jnp.dtype(dtype).name}, head dim {head_dim}); use "
            "attention_impl='auto' or 'xla'.")
    return impl


# --------------------------------------------------------------------------------------------------
# Attention-map control.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttnControl:
    """What the temporal self-attention layers (`...temporal_transformer_blocks.N.attn1`) do with their maps.

    * `AttnControl.capture()`: the model returns `(v, maps)`, maps keyed by the layer's diffusers path,
      each the post-softmax probabilities `[B·h·w, heads, F, F]` (rows batch-major, then pixel).
    * `AttnControl.inject(maps)`: each listed layer outputs `to_out(P @ to_v(x))` with the given `P`
      and computes no queries or keys; unlisted layers attend normally.
    """

    maps: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    mode: str = dataclasses.field(default="none", metadata=dict(static=True))
    layers: tuple[str, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def capture(cls, layers: tuple[str, ...] | None = None) -> "AttnControl":
        """Captures the maps of `layers` (all temporal self-attention layers when None)."""
        return cls(mode="capture", layers=None if layers is None else tuple(layers))

    @classmethod
    def inject(cls, maps: Mapping[str, jax.Array]) -> "AttnControl":
        """Replaces the probabilities of each layer named in `maps`."""
        return cls(maps=dict(maps), mode="inject")

    def captures(self, name: str) -> bool:
        return self.mode == "capture" and (self.layers is None or name in self.layers)

    def injected(self, name: str) -> jax.Array | None:
        return self.maps.get(name) if self.mode == "inject" else None


NO_CONTROL = AttnControl()


def rot180(maps: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Returns every map with both frame axes reversed: `P'[..., F-1-i, F-1-j] = P[..., i, j]`."""
    return {name: jnp.flip(p, axis=(-2, -1)) for name, p in maps.items()}


# --------------------------------------------------------------------------------------------------
# Modules.


class Attention(nnx.Module):
    """diffusers `Attention`: `to_q`, `to_k`, `to_v` (bias optional), `to_out.0` (with bias)."""

    def __init__(self, query_dim: int, *, heads: int, head_dim: int, context_dim: int | None = None,
                 qkv_bias: bool = False, impl: str = "auto", single_token_shortcut: bool = False,
                 rngs: nnx.Rngs):
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.head_dim = head_dim
        self.impl = impl
        self.single_token_shortcut = single_token_shortcut
        self.to_q = nnx.Linear(query_dim, inner, use_bias=qkv_bias, rngs=rngs)
        self.to_k = nnx.Linear(context_dim, inner, use_bias=qkv_bias, rngs=rngs)
        self.to_v = nnx.Linear(context_dim, inner, use_bias=qkv_bias, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, rngs=rngs)])

    def _split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Returns `[N, Lq, query_dim]` for `x [N, Lq, C]` attending to `context [N, Lk, D]` (itself if None)."""
        context = x if context is None else context
        q, k, v = (self._split_heads(p(t)) for p, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        kernel = ATTENTION_KERNELS[resolve_attention_impl(self.impl, q.dtype, self.head_dim)]
        out = kernel(q, k, v)
        return self.to_out[0](out.reshape(*out.shape[:-2], -1))

    def attend_per_video(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Cross-attention for `x [B, ..., L, C]` whose rows of video b all attend to `context[b]` `[B, Lc, D]`."""
        b, lc = context.shape[:2]
        if self.single_token_shortcut and lc == 1:
            # Softmax over a single key is exactly 1: every query receives to_out(to_v(context)).
            out = self.to_out[0](self.to_v(context))
            return jnp.broadcast_to(out.reshape(b, *(1,) * (x.ndim - 2), out.shape[-1]), x.shape)
        rows = x.reshape(-1, *x.shape[-2:])
        ctx = jnp.broadcast_to(context.reshape(b, *(1,) * (x.ndim - 3), *context.shape[1:]),
                               (*x.shape[:-2], *context.shape[1:]))
        return self(rows, ctx.reshape(-1, *context.shape[1:])).reshape(x.shape)


class TemporalSelfAttention(Attention):
    """Self-attention over frames with explicit probabilities, so maps can be captured or injected.

    `name` is the key of its map in `AttnControl` dicts: inside a UNet, its diffusers path, set by the UNet from
    the module graph (`name_temporal_attention`). `impl="pallas"` computes the
    attention core (logits, softmax, probabilities·v, the captured or injected maps) in one Triton kernel on an
    NVIDIA GPU (`temporal_attention_kernel`) wherever it takes the shapes, and through XLA elsewhere; both compute
    the same arithmetic. `impl="auto"` uses the kernel on Hopper GPUs (where it was measured faster) and XLA
    elsewhere.
    """

    def __init__(self, dim: int, *, heads: int, head_dim: int, name: str = "attn1", impl: str = "auto",
                 rngs: nnx.Rngs):
        super().__init__(dim, heads=heads, head_dim=head_dim, rngs=rngs)
        self.name = name
        self.core_impl = impl

    def _uses_kernel(self, frames: int) -> bool:
        if self.core_impl == "xla" or (self.core_impl == "auto" and not hardware.hopper_gpu()):
            return False
        hardware.require_triton_gpu("temporal_attention_impl")
        from jinbetween.models import temporal_attention_kernel

        return temporal_attention_kernel.fits(frames, self.head_dim)

    def __call__(self, x: jax.Array, attn: AttnControl = NO_CONTROL) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (`[N, F, C]`, captured maps) for `x [N, F, C]`."""
        from jinbetween.models import temporal_attention_kernel as core

        probs = attn.injected(self.name)
        expected = (x.shape[0], self.heads, x.shape[1], x.shape[1])
        if probs is not None and probs.shape != expected:
            raise InputShapeError(f"Injected map for {self.name} has shape {probs.shape}, expected {expected} "
                                  "([B·h·w, heads, F, F]); capture maps from a call with the same shapes.")
        kernel = self._uses_kernel(x.shape[1])
        v = self.to_v(x)
        captured = {}
        if probs is not None:  # GI's other direction: no queries or keys
            out = core.apply_probs(probs, v) if kernel else core.apply_probs_reference(probs, v)
        else:
            q, k = self.to_q(x), self.to_k(x)
            if attn.captures(self.name):
                capture = core.attend_capture if kernel else core.attend_capture_reference
                out, maps = capture(q, k, v, self.heads)
                captured = {self.name: maps.astype(x.dtype)}
            else:
                out = (core.attend if kernel else core.attend_reference)(q, k, v, self.heads)
        return self.to_out[0](out), captured


def temporal_attention_modules(module: nnx.Module) -> dict[str, TemporalSelfAttention]:
    """Returns {path: layer} of every temporal self-attention inside `module`, in call order: the one definition of
    these layers (in a UNet, `...temporal_transformer_blocks.N.attn1`), read from the module graph."""
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(module)
            if isinstance(node, TemporalSelfAttention)}


def name_temporal_attention(module: nnx.Module) -> nnx.Module:
    """Returns `module`, each of its temporal self-attention layers named by its path (the key of its maps)."""
    for name, layer in temporal_attention_modules(module).items():
        layer.name = name
    return module
