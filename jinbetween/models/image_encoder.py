"""ImageEncoder: transformers' `CLIPVisionModelWithProjection` in Flax NNX (SVD uses OpenCLIP ViT-H/14).

Only `image_embeds` is computed: the projected, *not* normalized, class token after post_layernorm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween.config import ImageEncoderConfig
from jinbetween.errors import InputShapeError
from jinbetween.models.activations import gelu_erf
from jinbetween.models.attention import ATTENTION_KERNELS, resolve_attention_impl
from jinbetween.models.layers import LayerNorm
from jinbetween.models.state import abstract

_ACTIVATIONS = {
    "gelu": gelu_erf,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class CLIPVisionEmbeddings(nnx.Module):
    """Patch embedding (conv without bias), class token, learned position table (rows = positions)."""

    def __init__(self, cfg: ImageEncoderConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)))
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, kernel_size=(cfg.patch_size,) * 2,
                                        strides=cfg.patch_size, padding="VALID", use_bias=False, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.num_positions, d, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixels)
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        n, _, d = patches.shape
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (n, 1, d))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...].astype(patches.dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: ImageEncoderConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.impl = cfg.attention_impl
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, length, d = x.shape
        q, k, v = (proj(x).reshape(n, length, self.heads, d // self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = ATTENTION_KERNELS[resolve_attention_impl(self.impl, q.dtype, d // self.heads)](q, k, v)
        return self.out_proj(out.reshape(n, length, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: ImageEncoderConfig, *, rngs: nnx.Rngs):
        self.activation = cfg.hidden_act
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.activation](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer layer: x += attn(LN₁ x); x += mlp(LN₂ x)."""

    def __init__(self, cfg: ImageEncoderConfig, *, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)
        self.mlp = CLIPMLP(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: ImageEncoderConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: ImageEncoderConfig, *, rngs: nnx.Rngs):
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)  # sic: the torch name
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Returns the pooled output `[N, hidden]`: post_layernorm of the class token."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0])


class ImageEncoder(nnx.Module):
    """CLIP vision tower + `visual_projection`: pixels `[N, S, S, 3]` (CLIP-normalized) → `[N, projection_dim]`."""

    def __init__(self, config: ImageEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, rngs=rngs)
        self.visual_projection = nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False, rngs=rngs)

    @property
    def dtype(self):
        return self.visual_projection.kernel[...].dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Returns image_embeds `[N, projection_dim]` float32 (not L2-normalized) for `pixels [N, S, S, C]`."""
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise InputShapeError(f"pixels have shape {pixels.shape}; expected [N, {', '.join(map(str, expected))}] "
                                  "channels-last and CLIP-normalized (see jinbetween.conditioning).")
        return self.visual_projection(self.vision_model(pixels.astype(self.dtype))).astype(jnp.float32)



def abstract_image_encoder(config: ImageEncoderConfig) -> ImageEncoder:
    """Returns an ImageEncoder whose parameters are ShapeDtypeStructs (no weights allocated)."""
    return abstract(ImageEncoder, config)
