"""VAE: diffusers' `AutoencoderKLTemporalDecoder` in Flax NNX, channels-last.

The encoder is the SD-VAE encoder (per image); the decoder treats the rows it is given as frames of
videos: its SpatioTemporal resblocks (blended with the decoder's 1−α convention) and `time_conv_out`
mix information across the frames of each decoded chunk.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween.config import VAEConfig
from jinbetween.errors import InputShapeError
from jinbetween.models.attention import Attention
from jinbetween.models.layers import Downsample2D, GroupNorm, Upsample2D, conv2d, temporal_conv
from jinbetween.models.resnet import ResnetBlock2D, SpatioTemporalResBlock

EPS = 1e-6
TEMPORAL_EPS = 1e-5
LOGVAR_RANGE = (-30.0, 20.0)


class VAEAttention(Attention):
    """Single-head self-attention over the pixels of each image, with biases, a GroupNorm and a residual."""

    def __init__(self, channels: int, *, impl: str, rngs: nnx.Rngs):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True, impl=impl, rngs=rngs)
        self.group_norm = GroupNorm(channels, eps=EPS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns `[N, H, W, C]` for `x [N, H, W, C]`."""
        n, h, w, c = x.shape
        return super().__call__(self.group_norm(x).reshape(n, h * w, c)).reshape(x.shape) + x


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, *, layers: int, downsample: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_dim=None, eps=EPS, rngs=rngs)
                                 for i in range(layers)])
        self.downsamplers = nnx.List([Downsample2D(out_ch, padding=0, rngs=rngs)]) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, None)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UNetMidBlock2D(nnx.Module):
    """resnet, attention, resnet."""

    def __init__(self, channels: int, *, impl: str, rngs: nnx.Rngs):
        self.attentions = nnx.List([VAEAttention(channels, impl=impl, rngs=rngs)])
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, temb_dim=None, eps=EPS, rngs=rngs)
                                 for _ in range(2)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, None)), None)


class Encoder(nnx.Module):
    """SD-VAE encoder: `[N, H, W, 3]` → moments `[N, H/8, W/8, 2·latent]` (before quant_conv)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        channels = cfg.block_out_channels
        self.conv_in = conv2d(cfg.in_channels, channels[0], 3, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(channels[max(i - 1, 0)], c, layers=cfg.layers_per_block,
                               downsample=i < len(channels) - 1, rngs=rngs)
            for i, c in enumerate(channels)])
        self.mid_block = UNetMidBlock2D(channels[-1], impl=cfg.attention_impl, rngs=rngs)
        self.conv_norm_out = GroupNorm(channels[-1], eps=EPS, rngs=rngs)
        self.conv_out = conv2d(channels[-1], 2 * cfg.latent_channels, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _decoder_resblock(in_ch: int, out_ch: int, rngs: nnx.Rngs) -> SpatioTemporalResBlock:
    return SpatioTemporalResBlock(in_ch, out_ch, temb_dim=None, eps=EPS, temporal_eps=TEMPORAL_EPS, mix_init=0.0,
                                  switch=True, rngs=rngs)


class MidBlockTemporalDecoder(nnx.Module):
    """`layers` resblocks with one attention: resnet₀, then (attention, resnet₁) — as diffusers pairs them."""

    def __init__(self, channels: int, *, layers: int, impl: str, rngs: nnx.Rngs):
        self.resnets = nnx.List([_decoder_resblock(channels, channels, rngs) for _ in range(layers)])
        self.attentions = nnx.List([VAEAttention(channels, impl=impl, rngs=rngs)])

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        x = self.resnets[0](x, None, num_frames)
        for resnet, attention in zip(self.resnets[1:], self.attentions):
            x = resnet(attention(x), None, num_frames)
        return x


class UpBlockTemporalDecoder(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, *, layers: int, upsample: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([_decoder_resblock(in_ch if i == 0 else out_ch, out_ch, rngs) for i in range(layers)])
        self.upsamplers = nnx.List([Upsample2D(out_ch, rngs=rngs)]) if upsample else None

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, None, num_frames)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class TemporalDecoder(nnx.Module):
    """Latents `[B·F, h, w, latent]` → images `[B·F, H, W, 3]`, mixing across the F frames of each video."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        reversed_channels = cfg.block_out_channels[::-1]
        self.conv_in = conv2d(cfg.latent_channels, reversed_channels[0], 3, rngs=rngs)
        self.mid_block = MidBlockTemporalDecoder(reversed_channels[0], layers=cfg.layers_per_block,
                                                 impl=cfg.attention_impl, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlockTemporalDecoder(reversed_channels[max(i - 1, 0)], c, layers=cfg.layers_per_block + 1,
                                   upsample=i < len(reversed_channels) - 1, rngs=rngs)
            for i, c in enumerate(reversed_channels)])
        self.conv_norm_out = GroupNorm(cfg.block_out_channels[0], eps=EPS, rngs=rngs)
        self.conv_out = conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, rngs=rngs)
        self.time_conv_out = temporal_conv(cfg.out_channels, cfg.out_channels, rngs=rngs)

    def __call__(self, z: jax.Array, num_frames: int) -> jax.Array:
        x = self.mid_block(self.conv_in(z), num_frames)
        for block in self.up_blocks:
            x = block(x, num_frames)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        video = x.reshape(-1, num_frames, *x.shape[1:])
        return self.time_conv_out(video).reshape(x.shape)


class VAE(nnx.Module):
    """The SVD VAE: `encode` images to posterior means, `decode` raw latents (÷ scaling_factor) to images."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = TemporalDecoder(config, rngs=rngs)
        self.quant_conv = conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1, rngs=rngs)

    @property
    def dtype(self):
        return self.quant_conv.kernel[...].dtype

    def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns the posterior (mean, logvar) `[N, h, w, latent]` (float32) of `images [N, H, W, 3]` in [-1, 1]."""
        factor = self.config.downsample_factor
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise InputShapeError(f"images have shape {images.shape}; expected [N, H, W, {self.config.in_channels}] "
                                  "channels-last in [-1, 1].")
        if images.shape[1] % factor or images.shape[2] % factor:
            raise InputShapeError(f"image size {images.shape[1]}×{images.shape[2]} is not a multiple of {factor}; "
                                  "resize or crop the keyframes first.")
        moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def encode(self, images: jax.Array) -> jax.Array:
        """Returns the posterior mean `[N, h, w, latent]` (unscaled, diffusers' `latent_dist.mode()`)."""
        return self.encode_moments(images)[0]

    def encode_sample(self, images: jax.Array, key: jax.Array) -> jax.Array:
        """Returns a posterior sample mean + exp(logvar/2)·ε with ε ~ N(0, 1) drawn from `key`."""
        mean, logvar = self.encode_moments(images)
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def decode(self, z: jax.Array, num_frames: int) -> jax.Array:
        """Returns images `[N, H, W, 3]` (float32, about [-1, 1]) for raw latents `z [N, h, w, latent]`.

        The N rows are N / num_frames videos of num_frames frames, exactly as diffusers' `decode`.
        """
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels or z.shape[0] % num_frames:
            raise InputShapeError(f"latents have shape {z.shape}; expected [N, h, w, {self.config.latent_channels}] "
                                  f"with N a multiple of num_frames={num_frames}.")
        return self.decoder(z.astype(self.dtype), num_frames).astype(jnp.float32)

    def decode_video(self, latents: jax.Array, chunk_size: int | None = None) -> jax.Array:
        """Returns frames `[F, H, W, 3]` for the sampler's latents `[F, h, w, latent]` (scaled by scaling_factor).

        Like diffusers' `decode_latents`: divides by scaling_factor and decodes `chunk_size` frames at a time
        (all F when None), each chunk an independent video; one jitted program, chunks run by `lax.map`.
        """
        graphdef, state = nnx.split(self)
        return _decode_video(graphdef, state, latents, min(chunk_size or latents.shape[0], latents.shape[0]))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, **runtime) -> "VAE":
        """Loads a diffusers `vae/` folder, an SVD pipeline folder, or a converted jinbetween dir."""
        from jinbetween.conversion import VAE_COMPONENT, load_component

        return load_component(path, VAE_COMPONENT, dtype=dtype, **runtime)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_video(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array, chunk_size: int) -> jax.Array:
    vae = nnx.merge(graphdef, state)
    z = latents / vae.config.scaling_factor
    frames = z.shape[0]
    full = frames // chunk_size * chunk_size
    chunks = z[:full].reshape(-1, chunk_size, *z.shape[1:])
    decoded = jax.lax.map(lambda chunk: nnx.merge(graphdef, state).decode(chunk, chunk_size), chunks)
    decoded = decoded.reshape(full, *decoded.shape[2:])
    if full < frames:
        decoded = jnp.concatenate([decoded, vae.decode(z[full:], frames - full)])
    return decoded


def abstract_vae(config: VAEConfig) -> VAE:
    """Returns a VAE whose parameters are ShapeDtypeStructs: the conversion target, no weights allocated."""
    return nnx.eval_shape(lambda: VAE(config, rngs=nnx.Rngs(0)))
