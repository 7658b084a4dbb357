"""UNet: diffusers' `UNetSpatioTemporalConditionModel` in Flax NNX, channels-last.

Attribute paths equal the diffusers state-dict names (`down_blocks.0.resnets.1.spatial_res_block.conv1`),
so a converted checkpoint can be audited key by key.
"""

from __future__ import annotations

import functools
from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween.config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, UNetConfig
from jinbetween.errors import InputShapeError
from jinbetween.models.attention import NO_CONTROL, AttnControl, name_temporal_attention, temporal_attention_modules
from jinbetween.models.layers import Downsample2D, GroupNorm, TimestepEmbedding, Upsample2D, conv2d, sincos_embedding
from jinbetween.models.resnet import SpatioTemporalResBlock
from jinbetween.models.state import abstract
from jinbetween.models.transformer import TransformerSpatioTemporalModel

Maps = dict[str, jax.Array]


def _transformers(cfg: UNetConfig, level: int, count: int, channels: int, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([
        TransformerSpatioTemporalModel(
            channels, heads=cfg.num_attention_heads[level], context_dim=cfg.cross_attention_dim[level],
            num_layers=cfg.transformer_layers_per_block[level], impl=cfg.attention_impl,
            shortcut=cfg.cross_attention_shortcut, ff_impl=cfg.feedforward_impl,
            temporal_impl=cfg.temporal_attention_impl, rngs=rngs)
        for j in range(count)])


class DownBlock(nnx.Module):
    """`CrossAttnDownBlockSpatioTemporal` (resnet eps 1e-6) or `DownBlockSpatioTemporal` (no attention, eps 1e-5)."""

    def __init__(self, cfg: UNetConfig, level: int, in_ch: int, *, rngs: nnx.Rngs):
        out_ch = cfg.block_out_channels[level]
        has_attention = cfg.down_block_types[level] == CROSS_ATTN_DOWN
        eps = 1e-6 if has_attention else 1e-5
        n = cfg.layers_per_block[level]
        self.resnets = nnx.List([
            SpatioTemporalResBlock(in_ch if i == 0 else out_ch, out_ch, temb_dim=cfg.time_embed_dim, eps=eps, rngs=rngs)
            for i in range(n)])
        self.attentions = (_transformers(cfg, level, n, out_ch, rngs)
                           if has_attention else None)
        is_last = level == len(cfg.block_out_channels) - 1
        self.downsamplers = None if is_last else nnx.List([Downsample2D(out_ch, padding=1, rngs=rngs)])

    def __call__(self, x, temb, context, num_frames, attn) -> tuple[jax.Array, list[jax.Array], Maps]:
        skips, maps = [], {}
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, num_frames)
            if self.attentions is not None:
                x, block_maps = self.attentions[i](x, context, num_frames, attn)
                maps.update(block_maps)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips, maps


class MidBlock(nnx.Module):
    """`UNetMidBlockSpatioTemporal`: resnet, then (transformer, resnet) once; resnet eps 1e-5."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        ch = cfg.block_out_channels[-1]
        self.resnets = nnx.List([
            SpatioTemporalResBlock(ch, ch, temb_dim=cfg.time_embed_dim, eps=1e-5, rngs=rngs) for _ in range(2)])
        self.attentions = _transformers(cfg, -1, 1, ch, rngs)

    def __call__(self, x, temb, context, num_frames, attn) -> tuple[jax.Array, Maps]:
        x = self.resnets[0](x, temb, num_frames)
        x, maps = self.attentions[0](x, context, num_frames, attn)
        return self.resnets[1](x, temb, num_frames), maps


class UpBlock(nnx.Module):
    """`CrossAttnUpBlockSpatioTemporal` or `UpBlockSpatioTemporal`: layers+1 resnets (eps 1e-6) on [x, skip]."""

    def __init__(self, cfg: UNetConfig, index: int, *, rngs: nnx.Rngs):
        channels = cfg.block_out_channels
        level = len(channels) - 1 - index
        out_ch = channels[level]
        prev_ch = channels[min(level + 1, len(channels) - 1)]
        skip_ch_last = channels[max(level - 1, 0)]
        n = cfg.layers_per_block[level] + 1
        has_attention = cfg.up_block_types[index] == CROSS_ATTN_UP
        self.resnets = nnx.List([
            SpatioTemporalResBlock((prev_ch if i == 0 else out_ch) + (skip_ch_last if i == n - 1 else out_ch),
                                   out_ch, temb_dim=cfg.time_embed_dim, eps=1e-6, rngs=rngs)
            for i in range(n)])
        self.attentions = (_transformers(cfg, level, n, out_ch, rngs)
                           if has_attention else None)
        self.upsamplers = None if level == 0 else nnx.List([Upsample2D(out_ch, rngs=rngs)])

    def __call__(self, x, skips, temb, context, num_frames, attn, upsample_size) -> tuple[jax.Array, Maps]:
        maps = {}
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb, num_frames)
            if self.attentions is not None:
                x, block_maps = self.attentions[i](x, context, num_frames, attn)
                maps.update(block_maps)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x, maps


class UNet(nnx.Module):
    """The SVD spatio-temporal UNet. `unet(x, c_noise, image_embeds, added_time_ids) -> (v, maps)`, channels-last."""

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        c0 = cfg.block_out_channels[0]
        self.conv_in = conv2d(cfg.in_channels, c0, 3, rngs=rngs)
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, rngs=rngs)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim,
                                               rngs=rngs)
        in_channels = (c0,) + cfg.block_out_channels[:-1]
        self.down_blocks = nnx.List([DownBlock(cfg, i, in_channels[i], rngs=rngs)
                                     for i in range(len(cfg.block_out_channels))])
        self.mid_block = MidBlock(cfg, rngs=rngs)
        self.up_blocks = nnx.List([UpBlock(cfg, i, rngs=rngs) for i in range(len(cfg.block_out_channels))])
        self.conv_norm_out = GroupNorm(c0, eps=1e-5, rngs=rngs)
        self.conv_out = conv2d(c0, cfg.out_channels, 3, rngs=rngs)
        name_temporal_attention(self)

    @property
    def dtype(self):
        """The compute dtype: that of the parameters."""
        return self.conv_in.kernel[...].dtype

    @property
    def temporal_attention_layers(self) -> tuple[str, ...]:
        """Diffusers paths of the temporal self-attention layers in call order: the keys of captured maps."""
        return tuple(temporal_attention_modules(self))

    def __call__(self, x: jax.Array, c_noise: jax.Array, image_embeds: jax.Array, added_time_ids: jax.Array,
                 *, attn: AttnControl | None = None,
                 remat: bool | Collection[str] = False) -> tuple[jax.Array, Maps]:
        """Returns (v `[B, F, h, w, out]` (float32), maps): maps holds the captured temporal attention maps, empty
        unless `attn` captures.

        x: `[B, F, h, w, in]` noisy latents (scaled by c_in) concatenated with the conditioning latents.
        c_noise: `[B]` or scalar, 0.25·ln σ. image_embeds: `[B, L, cross_dim]`. added_time_ids: `[B, ids]`.
        remat: under differentiation, keep only a block's inputs and recompute its activations in the backward
        pass (`jax.checkpoint` per block): True for every down/mid/up block, or the names of some (e.g.
        `high_res_blocks(config)`, whose activations are the largest); the same values, less training memory.
        """
        names = [name for name, _ in self.blocks()]
        rematted = set(names) if remat is True else set(remat or ())
        if not rematted <= set(names):
            raise ValueError(f"remat names unknown blocks {sorted(rematted - set(names))}; the blocks are {names}.")
        cfg = self.config
        control = NO_CONTROL if attn is None else attn
        b, f, h, w = self._check_inputs(x, c_noise, image_embeds, added_time_ids)
        dtype = self.dtype

        temb = self.time_embedding(sincos_embedding(jnp.broadcast_to(c_noise, (b,)), cfg.block_out_channels[0])
                                   .astype(dtype))
        ids_emb = sincos_embedding(added_time_ids, cfg.addition_time_embed_dim).reshape(b, -1)
        temb = temb + self.add_embedding(ids_emb.astype(dtype))
        temb = jnp.repeat(temb, f, axis=0)  # [B·F, T], frame fastest
        context = image_embeds.astype(dtype)

        z = self.conv_in(x.astype(dtype).reshape(b * f, h, w, -1))
        skips, maps = [z], {}
        for i, block in enumerate(self.down_blocks):
            z, block_skips, block_maps = _call_block(block, f"down_blocks.{i}" in rematted,
                                                     lambda m, *a: m(*a, f, control), z, temb, context)
            skips += block_skips
            maps.update(block_maps)
        z, block_maps = _call_block(self.mid_block, "mid_block" in rematted, lambda m, *a: m(*a, f, control),
                                    z, temb, context)
        maps.update(block_maps)
        for i, block in enumerate(self.up_blocks):
            skips_of_block = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            upsample_size = skips[-1].shape[1:3] if skips else None
            z, block_maps = _call_block(
                block, f"up_blocks.{i}" in rematted, lambda m, z, s, t, c: m(z, s, t, c, f, control, upsample_size),
                z, skips_of_block, temb, context)
            maps.update(block_maps)
        z = self.conv_out(jax.nn.silu(self.conv_norm_out(z)))
        v = z.reshape(b, f, h, w, -1).astype(jnp.float32)
        return v, maps

    def blocks(self) -> list[tuple[str, nnx.Module]]:
        """The down, mid and up blocks with their diffusers names, in call order."""
        return ([(f"down_blocks.{i}", b) for i, b in enumerate(self.down_blocks)] + [("mid_block", self.mid_block)]
                + [(f"up_blocks.{i}", b) for i, b in enumerate(self.up_blocks)])

    def _check_inputs(self, x, c_noise, image_embeds, added_time_ids) -> tuple[int, int, int, int]:
        cfg = self.config
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise InputShapeError(f"x has shape {x.shape}; expected [B, F, h, w, {cfg.in_channels}] (channels-last: "
                                  "noisy latents concatenated with the conditioning latents).")
        b, f, h, w, _ = x.shape
        if jnp.ndim(c_noise) not in (0, 1) or (jnp.ndim(c_noise) == 1 and jnp.shape(c_noise)[0] != b):
            raise InputShapeError(f"c_noise has shape {jnp.shape(c_noise)}; expected a scalar or [{b}].")
        expected_ctx = cfg.cross_attention_dim[0]
        if image_embeds.ndim != 3 or image_embeds.shape[0] != b or image_embeds.shape[2] != expected_ctx:
            raise InputShapeError(f"image_embeds has shape {image_embeds.shape}; expected [{b}, L, {expected_ctx}] "
                                  "(add the token axis: image_embeds[:, None]).")
        if added_time_ids.shape != (b, cfg.num_ids):
            raise InputShapeError(f"added_time_ids has shape {added_time_ids.shape}; expected [{b}, {cfg.num_ids}] "
                                  "(fps-1, motion_bucket_id, noise_aug_strength per video).")
        return b, f, h, w



def _call_block(block: nnx.Module, remat: bool, call, *arrays):
    """Returns `call(block, *arrays)`, as one `jax.checkpoint` region of the block's parameters and `arrays` if
    `remat`. `call` closes over the static arguments and the attention control (whose maps are constants here)."""
    if not remat:
        return call(block, *arrays)
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda state, *arrays: call(nnx.merge(graphdef, state), *arrays))(state, *arrays)


def high_res_blocks(cfg: UNetConfig) -> tuple[str, str]:
    """The blocks at full latent resolution, the first down and the last up block: the bulk of the activation
    memory of a backward pass, and less than half of the FLOPs (SVD-XT: down_blocks.0 and up_blocks.3)."""
    return "down_blocks.0", f"up_blocks.{len(cfg.block_out_channels) - 1}"


@functools.cache
def temporal_attention_channels(cfg: UNetConfig) -> dict[str, int]:
    """Returns {diffusers path: channels} of the temporal self-attention layers of a UNet of this config, in call
    order (the keys of captured maps; W_v and W_o of each are square `[C, C]`)."""
    return {name: layer.to_v.in_features for name, layer in temporal_attention_modules(abstract_unet(cfg)).items()}


def temporal_attention_layers(cfg: UNetConfig) -> tuple[str, ...]:
    """Returns the diffusers paths of the temporal self-attention layers of a UNet of this config, in call order."""
    return tuple(temporal_attention_channels(cfg))


def unet_apply(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, c_noise: jax.Array,
               image_embeds: jax.Array, added_time_ids: jax.Array,
               attn: AttnControl | None = None) -> tuple[jax.Array, Maps]:
    """Returns the UNet's (v, maps) as a pure function of `nnx.split(unet)`, for `jax.jit` with `graphdef` static."""
    return nnx.merge(graphdef, params)(x, c_noise, image_embeds, added_time_ids, attn=attn)


def abstract_unet(config: UNetConfig) -> UNet:
    """Returns a UNet whose parameters are ShapeDtypeStructs: the conversion target, no weights allocated."""
    return abstract(UNet, config)
