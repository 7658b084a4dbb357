"""Primitive layers shared by the UNet, VAE and image encoder, channels-last.

Normalizations accumulate in float32 (GroupNorm's variance from data shifted near its mean, never E[x²]−E[x]²)
and take their epsilon explicitly: Flax's defaults differ from PyTorch's. GELU is the exact erf form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jinbetween import hardware
from jinbetween.models import geglu_kernel
from jinbetween.models.activations import geglu_gate


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on channels-last input: statistics per row of axis 0 and per channel group.

    On `[N, H, W, C]` the statistics are per image; on `[B, F, H, W, C]` they span all frames of a
    video, as PyTorch does for a 5-D `[B, C, F, H, W]` tensor.
    """

    def __init__(self, num_channels: int, *, num_groups: int = 32, eps: float, rngs: nnx.Rngs):
        del rngs
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.normalize(x, *self.moments(x))

    def group(self, x: jax.Array) -> jax.Array:
        """Returns float32 `x` viewed as `[..., groups, C/groups]`."""
        c = x.shape[-1]
        return x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)

    @staticmethod
    def statistic_axes(grouped: jax.Array) -> tuple[int, ...]:
        """The axes of a grouped array that one statistic spans: all but the row axis and the group axis."""
        return tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)

    def moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (mean, variance) per row and group, shaped to broadcast against `group(x)`.

        One pass over `x`: the sums of d = x − s and d², where the shift s is the mean of the group's first line
        (index 0 along every statistic axis but the last two: one image row). E[d²] − E[d]² does not depend on s,
        and a shift near the mean keeps float32 from cancelling the variance away, as E[x²] − E[x]² does when
        |mean| ≫ std. XLA fuses both sums into one reduction that reads `x` once; a two-pass variance reads it
        twice (bench/NOTES.md).
        """
        grouped = self.group(x)
        axes = self.statistic_axes(grouped)
        line = tuple(slice(0, 1) if axis in axes[:-2] else slice(None) for axis in range(grouped.ndim))
        shift = jax.lax.stop_gradient(grouped[line].mean(axes, keepdims=True))
        centered = grouped - shift
        mean_centered = centered.mean(axes, keepdims=True)
        var = jnp.maximum(jnp.square(centered).mean(axes, keepdims=True) - jnp.square(mean_centered), 0.0)
        return shift + mean_centered, var

    def normalize(self, x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
        """Returns `x` normalized with the given group moments, then scaled and shifted, in `x`'s dtype."""
        y = ((self.group(x) - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis, float32 statistics."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centered = x32 - x32.mean(-1, keepdims=True)
        var = jnp.square(centered).mean(-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def sincos_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Returns `[*t.shape, dim]` float32 `[cos | sin]` features (diffusers Timesteps, flip_sin_to_cos, shift 0)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half
    args = t.astype(jnp.float32)[..., None] * jnp.exp(exponent)
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


class TimestepEmbedding(nnx.Module):
    """Linear → SiLU → Linear (`linear_1`, `linear_2`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, *, rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(in_dim, hidden_dim, rngs=rngs)
        self.linear_2 = nnx.Linear(hidden_dim, out_dim or hidden_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
    """Linear to 2·inner, split as [value | gate], value · gelu_erf(gate), the product in float32.

    `impl="pallas"` computes the projection and the gate in one Triton kernel on an NVIDIA GPU
    (`geglu_kernel.geglu_fused`) wherever its tiles divide the shapes, and XLA's two passes elsewhere.
    """

    def __init__(self, dim: int, inner_dim: int, *, impl: str = "xla", rngs: nnx.Rngs):
        self.impl = impl
        self.proj = nnx.Linear(dim, 2 * inner_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl == "pallas":
            hardware.require_triton_gpu("feedforward_impl")
            channels, inner = x.shape[-1], self.proj.out_features // 2
            rows = x.size // channels
            if geglu_kernel.fits(rows, channels, inner):
                out = geglu_kernel.geglu_fused(x.reshape(rows, channels), self.proj.kernel[...], self.proj.bias[...])
                return out.reshape(*x.shape[:-1], inner)
        return geglu_gate(self.proj(x))


class FeedForward(nnx.Module):
    """diffusers FeedForward with GEGLU: `net.0` (GEGLU), `net.1` (dropout, no parameters), `net.2` (Linear)."""

    def __init__(self, dim: int, out_dim: int | None = None, *, mult: int = 4, impl: str = "xla", rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, impl=impl, rngs=rngs), None,
                             nnx.Linear(inner, out_dim or dim, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


def conv2d(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: int | None = None,
           rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D convolution with explicit symmetric padding (kernel // 2 unless given), like torch.nn.Conv2d."""
    pad = kernel // 2 if padding is None else padding
    return nnx.Conv(in_ch, out_ch, kernel_size=(kernel, kernel), strides=stride,
                    padding=((pad, pad), (pad, pad)), rngs=rngs)


class TemporalConv(nnx.Module):
    """torch Conv3d with kernel (3,1,1), padding (1,0,0): a conv along the frames of `[B, F, H, W, C]`.

    The kernel keeps Conv3d's shape `(3, 1, 1, in, out)` (checkpoints are unchanged), but the product runs as a 2-D
    `(3, 1)` convolution of `[B, F, H·W, C]`: cuDNN takes that in its native NHWC layout, where a 3-D convolution
    costs three layout transposes of the whole activation around every call on the GPU (bench/NOTES.md).
    """

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        # Initialized as nnx.Conv does, drawing one key for each parameter, so models initialize as before.
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (3, 1, 1, in_ch, out_ch)))
        self.bias = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (out_ch,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns `[B, F, H, W, out]` for `x [B, F, H, W, in]`."""
        b, f, h, w, _ = x.shape
        kernel = self.kernel[...].astype(x.dtype)[:, 0]  # (3, 1, in, out): frames as the conv's height
        out = jax.lax.conv_general_dilated(x.reshape(b, f, h * w, -1), kernel, window_strides=(1, 1),
                                           padding=((1, 1), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (out + self.bias[...].astype(x.dtype)).reshape(b, f, h, w, -1)


class Downsample2D(nnx.Module):
    """3×3 stride-2 conv (`conv`). `padding=1` pads every side (UNet); `padding=0` pads right/bottom by one (VAE)."""

    def __init__(self, channels: int, *, padding: int = 1, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = conv2d(channels, channels, 3, stride=2, padding=padding, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Returns `[N, *size, C]`, nearest neighbour with torch's index rule src = floor(dst · in/out) (float32)."""
    out = x
    for axis, (n_in, n_out) in zip((1, 2), zip(x.shape[1:3], size)):
        if n_out == 2 * n_in:
            out = jnp.repeat(out, 2, axis=axis)
        elif n_out != n_in:
            scale = np.float32(n_in) / np.float32(n_out)
            src = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
            out = jnp.take(out, src, axis=axis)
    return out


class Upsample2D(nnx.Module):
    """Nearest 2× (or to an explicit size) then a 3×3 conv (`conv`)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        return self.conv(nearest_resize(x, size))
