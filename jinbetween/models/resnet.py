"""Residual blocks: ResnetBlock2D, TemporalResnetBlock, AlphaBlender and SpatioTemporalResBlock.

Activations are channels-last with frames folded into the batch (`[B·F, H, W, C]`, frame fastest),
as in diffusers; the temporal parts view them as `[B, F, H, W, C]`, a free reshape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween.models.layers import GroupNorm, TemporalConv, conv2d


def _add_in_f32(h: jax.Array, offset: jax.Array) -> jax.Array:
    """h + offset (a per-frame broadcast), added in float32 and returned in h's dtype. XLA folds a same-dtype add
    of a broadcast into the cuDNN convolution before it as a "side input", which it materializes at the full
    activation size first; in float32 the add stays a separate elementwise op, fused into the GroupNorm after it."""
    return (h.astype(jnp.float32) + offset.astype(jnp.float32)).astype(h.dtype)


class ResnetBlock2D(nnx.Module):
    """Per-frame resnet: GN-SiLU-conv, + Linear(SiLU(temb)), GN-SiLU-conv, 1×1 shortcut when channels change."""

    def __init__(self, in_ch: int, out_ch: int, *, temb_dim: int | None, eps: float, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(in_ch, eps=eps, rngs=rngs)
        self.conv1 = conv2d(in_ch, out_ch, 3, rngs=rngs)
        self.time_emb_proj = nnx.Linear(temb_dim, out_ch, rngs=rngs) if temb_dim else None
        self.norm2 = GroupNorm(out_ch, eps=eps, rngs=rngs)
        self.conv2 = conv2d(out_ch, out_ch, 3, rngs=rngs)
        self.conv_shortcut = conv2d(in_ch, out_ch, 1, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        """Returns `[N, H, W, out]` for `x [N, H, W, in]`, `temb [N, T]`."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = _add_in_f32(h, self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :])
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class TemporalResnetBlock(nnx.Module):
    """Resnet along frames: (3,1,1) convs, GroupNorm statistics over all frames of a video."""

    def __init__(self, channels: int, *, temb_dim: int | None, eps: float, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(channels, eps=eps, rngs=rngs)
        self.conv1 = TemporalConv(channels, channels, rngs=rngs)
        self.time_emb_proj = nnx.Linear(temb_dim, channels, rngs=rngs) if temb_dim else None
        self.norm2 = GroupNorm(channels, eps=eps, rngs=rngs)
        self.conv2 = TemporalConv(channels, channels, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        """Returns `[B, F, H, W, C]` for `x [B, F, H, W, C]`, `temb [B, F, T]`."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = _add_in_f32(h, self.time_emb_proj(jax.nn.silu(temb))[:, :, None, None, :])
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return x + h


class AlphaBlender(nnx.Module):
    """α·spatial + (1−α)·temporal with α = sigmoid(mix_factor); `switch` uses 1−α (the VAE decoder's convention).

    SVD's `learned_with_images` strategy gives α = 1 only for image-only batches, which inference and
    video training never use, so both strategies reduce to `learned` here.
    """

    def __init__(self, *, init: float, switch: bool = False, rngs: nnx.Rngs):
        del rngs
        self.switch = switch
        self.mix_factor = nnx.Param(jnp.full((1,), init, jnp.float32))

    def __call__(self, spatial: jax.Array, temporal: jax.Array) -> jax.Array:
        alpha = jax.nn.sigmoid(self.mix_factor[...].astype(jnp.float32)).astype(spatial.dtype)
        if self.switch:
            alpha = 1 - alpha
        return alpha * spatial + (1 - alpha) * temporal


class SpatioTemporalResBlock(nnx.Module):
    """`spatial_res_block` per frame, `temporal_res_block` over its output, blended by `time_mixer`."""

    def __init__(self, in_ch: int, out_ch: int, *, temb_dim: int | None, eps: float,
                 temporal_eps: float | None = None, mix_init: float = 0.5, switch: bool = False,
                 rngs: nnx.Rngs):
        self.spatial_res_block = ResnetBlock2D(in_ch, out_ch, temb_dim=temb_dim, eps=eps, rngs=rngs)
        self.temporal_res_block = TemporalResnetBlock(
            out_ch, temb_dim=temb_dim, eps=eps if temporal_eps is None else temporal_eps, rngs=rngs)
        self.time_mixer = AlphaBlender(init=mix_init, switch=switch, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array | None, num_frames: int) -> jax.Array:
        """Returns `[B·F, H, W, out]` for `x [B·F, H, W, in]`, `temb [B·F, T]` or None."""
        spatial = self.spatial_res_block(x, temb)
        video = spatial.reshape(-1, num_frames, *spatial.shape[1:])
        temb_video = None if temb is None else temb.reshape(-1, num_frames, temb.shape[-1])
        temporal = self.temporal_res_block(video, temb_video)
        return self.time_mixer(video, temporal).reshape(spatial.shape)
