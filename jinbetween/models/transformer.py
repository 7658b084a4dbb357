"""TransformerSpatioTemporalModel: a spatial transformer block per frame, a temporal one per pixel, blended.

Cross-attention context is passed per video (`[B, L, D]`): diffusers repeats it for every frame
(spatial) and broadcasts frame 0's copy over every pixel (temporal), which is the same thing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween.models.attention import NO_CONTROL, Attention, AttnControl, TemporalSelfAttention
from jinbetween.models.layers import FeedForward, GroupNorm, LayerNorm, TimestepEmbedding, sincos_embedding
from jinbetween.models.resnet import AlphaBlender

LN_EPS = 1e-5


class BasicTransformerBlock(nnx.Module):
    """Spatial block: self-attention over the pixels of each frame, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, *, heads: int, context_dim: int, impl: str, shortcut: bool, ff_impl: str = "xla",
                 rngs: nnx.Rngs):
        head_dim = dim // heads
        self.norm1 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, impl=impl, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
        self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim, impl=impl,
                               single_token_shortcut=shortcut, rngs=rngs)
        self.norm3 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
        self.ff = FeedForward(dim, impl=ff_impl, rngs=rngs)

    def __call__(self, z: jax.Array, context: jax.Array) -> jax.Array:
        """Returns `[B, F, S, C]` for `z [B, F, S, C]`, `context [B, L, D]`."""
        b, f, s, c = z.shape
        z = z + self.attn1(self.norm1(z).reshape(b * f, s, c)).reshape(z.shape)
        z = z + self.attn2.attend_per_video(self.norm2(z), context)
        return z + self.ff(self.norm3(z))


class TemporalBasicTransformerBlock(nnx.Module):
    """Temporal block over the frames of each pixel: GEGLU in, self-attention (maps), cross-attention, GEGLU."""

    def __init__(self, dim: int, *, heads: int, context_dim: int, impl: str, shortcut: bool,
                 ff_impl: str = "xla", temporal_impl: str = "auto", rngs: nnx.Rngs):
        head_dim = dim // heads
        self.norm_in = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
        self.ff_in = FeedForward(dim, impl=ff_impl, rngs=rngs)
        self.norm1 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
        self.attn1 = TemporalSelfAttention(dim, heads=heads, head_dim=head_dim, impl=temporal_impl, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
        self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim, impl=impl,
                               single_token_shortcut=shortcut, rngs=rngs)
        self.norm3 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
        self.ff = FeedForward(dim, impl=ff_impl, rngs=rngs)

    def __call__(self, z: jax.Array, context: jax.Array, attn: AttnControl = NO_CONTROL,
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (`[B, F, S, C]`, captured maps) for `z [B, F, S, C]`, `context [B, L, D]`."""
        b, f, s, c = z.shape
        z = z.transpose(0, 2, 1, 3)  # [B, S, F, C]: one sequence of frames per pixel
        z = z + self.ff_in(self.norm_in(z))
        attn_out, maps = self.attn1(self.norm1(z).reshape(b * s, f, c), attn)
        z = z + attn_out.reshape(z.shape)
        z = z + self.attn2.attend_per_video(self.norm2(z), context)
        z = z + self.ff(self.norm3(z))
        return z.transpose(0, 2, 1, 3), maps


class TransformerSpatioTemporalModel(nnx.Module):
    """GN → proj_in → [spatial block, + frame-index embedding → temporal block, time_mixer]ₙ → proj_out, + input."""

    def __init__(self, channels: int, *, heads: int, context_dim: int, num_layers: int, impl: str,
                 shortcut: bool, ff_impl: str = "xla", temporal_impl: str = "auto", rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, eps=1e-6, rngs=rngs)
        self.proj_in = nnx.Linear(channels, channels, rngs=rngs)
        kw = dict(heads=heads, context_dim=context_dim, impl=impl, shortcut=shortcut, ff_impl=ff_impl, rngs=rngs)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(channels, **kw) for _ in range(num_layers)])
        self.temporal_transformer_blocks = nnx.List([
            TemporalBasicTransformerBlock(channels, temporal_impl=temporal_impl, **kw)
            for i in range(num_layers)])
        self.time_pos_embed = TimestepEmbedding(channels, 4 * channels, channels, rngs=rngs)
        self.time_mixer = AlphaBlender(init=0.5, rngs=rngs)
        self.proj_out = nnx.Linear(channels, channels, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, num_frames: int, attn: AttnControl = NO_CONTROL,
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (`[B·F, H, W, C]`, captured maps) for `x [B·F, H, W, C]`, `context [B, L, D]`."""
        bf, h, w, c = x.shape
        z = self.proj_in(self.norm(x).reshape(bf // num_frames, num_frames, h * w, c))
        frame_emb = self.time_pos_embed(sincos_embedding(jnp.arange(num_frames), c).astype(z.dtype))
        maps: dict[str, jax.Array] = {}
        for spatial, temporal in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            z = spatial(z, context)
            z_temporal, block_maps = temporal(z + frame_emb[None, :, None, :], context, attn)
            z = self.time_mixer(z, z_temporal)
            maps.update(block_maps)
        return self.proj_out(z).reshape(x.shape) + x, maps
