"""VAE: diffusers' `AutoencoderKLTemporalDecoder` in Flax NNX, channels-last.

The encoder is the SD-VAE encoder (per image); the decoder treats the rows it is given as frames of
videos: its SpatioTemporal resblocks (blended with the decoder's 1−α convention) and `time_conv_out`
mix information across the frames of each decoded chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween.config import VAEConfig
from jinbetween.errors import InputShapeError
from jinbetween.models.attention import Attention
from jinbetween.models.layers import Downsample2D, GroupNorm, TemporalConv, Upsample2D, conv2d
from jinbetween.models.resnet import ResnetBlock2D, SpatioTemporalResBlock
from jinbetween.models.state import abstract

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

    def layers(self) -> list:
        """The block's layers in call order: resnet₀, then each (attention, resnet)."""
        out = [self.resnets[0]]
        for resnet, attention in zip(self.resnets[1:], self.attentions):
            out += [attention, resnet]
        return out


class UpBlockTemporalDecoder(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, *, layers: int, upsample: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([_decoder_resblock(in_ch if i == 0 else out_ch, out_ch, rngs) for i in range(layers)])
        self.upsamplers = nnx.List([Upsample2D(out_ch, rngs=rngs)]) if upsample else None

    def layers(self) -> list:
        """The block's layers in call order: its resnets, then the upsampler if any."""
        return list(self.resnets) + ([] if self.upsamplers is None else [self.upsamplers[0]])


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
        self.time_conv_out = TemporalConv(cfg.out_channels, cfg.out_channels, rngs=rngs)
        self.lean = cfg.lean_decode

    def layers(self) -> list:
        """The decoder up to `time_conv_out` in call order: per-frame callables `[N, H, W, C] → [N, H', W', C']`
        and SpatioTemporalResBlocks (a per-frame part, then a part that mixes the frames)."""
        head = [self.conv_in, *self.mid_block.layers()]
        body = [layer for block in self.up_blocks for layer in block.layers()]
        return [*head, *body, lambda x: self.conv_out(jax.nn.silu(self.conv_norm_out(x)))]

    def __call__(self, z: jax.Array, num_frames: int) -> jax.Array:
        per_frame = []  # per-frame layers not yet applied; the lean path runs them together, frame by frame
        x = z
        for layer in self.layers():
            if isinstance(layer, SpatioTemporalResBlock):
                if not self.lean:
                    x = layer(x, None, num_frames)
                    continue
                per_frame.append(functools.partial(layer.spatial_res_block, temb=None))
                x = _frame_by_frame(per_frame, x)
                per_frame = []
                x = _temporal_blend_by_rows(layer, x.reshape(-1, num_frames, *x.shape[1:])).reshape(x.shape)
            elif self.lean:
                per_frame.append(layer)
            else:
                x = layer(x)
        x = _frame_by_frame(per_frame, x)
        video = x.reshape(-1, num_frames, *x.shape[1:])
        return self.time_conv_out(video).reshape(x.shape)


# Lean decoding: the same layers, evaluated so that few full-resolution tensors of a chunk are alive at once.

ROW_TILE_ELEMENTS = 1 << 26  # elements of one row tile of a temporal block (128 MiB in bf16)
FRAMES_PER_STEP = 1  # frames per step of the per-frame layers (the largest divisor of the chunk up to this)


def _frame_by_frame(layers: list, x: jax.Array) -> jax.Array:
    """Returns `layers` applied in turn to `x [N, H, W, C]`, a few rows (frames) at a time (`fori_loop`)."""
    if not layers:
        return x
    group = max(g for g in range(1, FRAMES_PER_STEP + 1) if x.shape[0] % g == 0)

    def frames(i, out):
        y = _apply(layers, jax.lax.dynamic_slice_in_dim(x, i * group, group))
        return jax.lax.dynamic_update_slice_in_dim(out, y, i * group, axis=0)

    out_struct = jax.eval_shape(lambda x: _apply(layers, x[:group]), x)
    # The output buffer is made from x's data so that the scheduler cannot allocate it before x exists
    # (independent buffers of consecutive loops were otherwise all placed at the program's start).
    init = jnp.zeros((x.shape[0], *out_struct.shape[1:]), out_struct.dtype) * x[0, 0, 0, 0].astype(out_struct.dtype)
    return jax.lax.fori_loop(0, x.shape[0] // group, frames, init)


def _apply(layers: list, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


def _row_tiles(video: jax.Array) -> int:
    """Returns the number of equal row tiles of `video [B, F, H, W, C]`: the fewest within ROW_TILE_ELEMENTS."""
    height = video.shape[2]
    row = video.size // height
    return next(n for n in range(1, height + 1) if height % n == 0 and (height // n) * row <= ROW_TILE_ELEMENTS
                or n == height)


def _temporal_blend_by_rows(block: SpatioTemporalResBlock, video: jax.Array) -> jax.Array:
    """Returns `block`'s temporal part and blend on its spatial output `video [B, F, H, W, C]`, in row tiles.

    The temporal layers are pointwise in space, so rows are independent except for the GroupNorm
    statistics, which span the whole video: norm1's come from `video`, norm2's from its first conv's output,
    accumulated tile by tile (Chan's pairwise mean/variance merge) without holding that output, which the
    second pass recomputes per tile. Equal to `block.time_mixer(video, block.temporal_res_block(video))` up to
    float summation order.
    """
    temporal = block.temporal_res_block
    tiles = _row_tiles(video)
    rows = video.shape[2] // tiles
    moments1 = temporal.norm1.moments(video)

    def tile(i):  # rows [i·rows, (i+1)·rows), sliced in place: a transposed copy would cost a whole video
        return jax.lax.dynamic_slice_in_dim(video, i * rows, rows, axis=2)

    def first_conv(x):
        return temporal.conv1(jax.nn.silu(temporal.norm1.normalize(x, *moments1)))

    def tile_moments(i):
        grouped = temporal.norm2.group(first_conv(tile(i)))
        axes = temporal.norm2.statistic_axes(grouped)
        mean = grouped.mean(axes, keepdims=True)
        return mean, jnp.square(grouped - mean).sum(axes, keepdims=True)

    means, sums_sq = jax.lax.map(tile_moments, jnp.arange(tiles))  # per tile: mean and Σ(x − mean)²
    count = video.size // (tiles * video.shape[0] * temporal.norm2.num_groups)  # elements per tile and group
    mean = means.mean(0)
    var = (sums_sq.sum(0) + count * jnp.square(means - mean).sum(0)) / (tiles * count)

    def blend_tile(i, out):  # each tile's output depends on that tile alone: written over the input in place
        x = jax.lax.dynamic_slice_in_dim(out, i * rows, rows, axis=2)
        h2 = temporal.conv2(jax.nn.silu(temporal.norm2.normalize(first_conv(x), mean, var)))
        return jax.lax.dynamic_update_slice_in_dim(out, block.time_mixer(x, x + h2), i * rows, axis=2)

    return jax.lax.fori_loop(0, tiles, blend_tile, video)


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
    return abstract(VAE, config)
