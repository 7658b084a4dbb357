"""Keyframe conditioning, exactly as diffusers' StableVideoDiffusionPipeline builds it.

* CLIP input (host, numpy): the clean image in [-1, 1], anti-aliased (Gaussian blur with reflect
  padding), bicubic-resized (A = −0.75, align_corners) to the encoder's size, back to [0, 1], then
  normalized with the CLIP mean/std. `jax.image.resize` uses another kernel and differs by ~0.44.
* VAE conditioning latent: posterior mean of the image + noise_aug_strength·noise, *unscaled*.
* Added time ids: [fps − 1, motion_bucket_id, noise_aug_strength] (SVD was trained on fps − 1).
* Classifier-free guidance: zeros for the unconditional half, which comes first.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC_A = -0.75


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditioning:
    """A keyframe's conditioning arrays (leading batch axes allowed on every field).

    image_embeds: `[L, D]` CLIP image embedding of the clean keyframe (L = 1 token).
    image_latent: `[h, w, C]` VAE posterior mean of the noise-augmented keyframe, unscaled.
    clean_latent: `[h, w, C]` scaling_factor × posterior mean of the clean keyframe (for endpoint pins).
    added_time_ids: `[3]` fps − 1, motion_bucket_id, noise_aug_strength.
    """

    image_embeds: jax.Array
    image_latent: jax.Array
    clean_latent: jax.Array
    added_time_ids: jax.Array


# --------------------------------------------------------------------------------------------------
# CLIP preprocessing (host).


def _gaussian_blur_matrix(n: int, sigma: float, size: int) -> np.ndarray:
    """`[n, n]` matrix of a normalized Gaussian blur of odd `size` with reflect padding (edge not repeated)."""
    offsets = np.arange(size, dtype=np.float32) - size // 2
    kernel = np.exp(-(offsets**2) / np.float32(2 * np.float32(sigma) ** 2))
    kernel = kernel / kernel.sum()
    matrix = np.zeros((n, n))
    for i in range(n):
        src = i + offsets.astype(np.int64)
        src = np.abs(src)  # reflect at the start ...
        src = np.where(src > n - 1, 2 * (n - 1) - src, src)  # ... and at the end
        np.add.at(matrix[i], src, kernel)
    return matrix


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` matrix of torch's bicubic interpolation with align_corners=True, border taps clamped."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    real = scale * np.arange(n_out, dtype=np.float32)
    base = np.floor(real).astype(np.int64)
    t = (real - base).astype(np.float64)
    a = BICUBIC_A
    weights = np.stack([
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ], axis=1)
    matrix = np.zeros((n_out, n_in))
    for tap in range(4):
        np.add.at(matrix, (np.arange(n_out), np.clip(base - 1 + tap, 0, n_in - 1)), weights[:, tap])
    return matrix


@functools.lru_cache(maxsize=16)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Blur (σ = max((n_in/n_out − 1)/2, 0.001), odd size ≥ 3) followed by bicubic resizing, as one matrix."""
    sigma = max((n_in / n_out - 1.0) / 2.0, 0.001)
    size = int(max(2.0 * 2 * sigma, 3))
    size += 1 - size % 2
    return _bicubic_matrix(n_in, n_out) @ _gaussian_blur_matrix(n_in, sigma, size)


def clip_resize_matrices(height: int, width: int, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """Returns (rows `[size, height]`, columns `[size, width]`) float64: diffusers' `_resize_with_antialiasing` of an
    image to `size × size` is `rows · image · columnsᵀ` (the aspect ratio is not kept)."""
    return _resize_matrix(height, size), _resize_matrix(width, size)


def clip_normalize(resized, mean=CLIP_MEAN, std=CLIP_STD):
    """Returns the CLIP encoder input of resized pixels in [-1, 1] (numpy or jax, float32): CLIPImageProcessor's
    normalization."""
    return ((resized + 1) / 2 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_pixels(images: np.ndarray, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """Returns `[N, size, size, 3]` float32 CLIP encoder input for uint8 `images [N, H, W, 3]`, resized on the host
    in float64 (`clip_resize_matrices`) and normalized (`clip_normalize`)."""
    x = np.asarray(images, np.float32) / 255 * 2 - 1
    rows, cols = clip_resize_matrices(x.shape[1], x.shape[2], size)
    resized = np.einsum("ih,nhwc->niwc", rows, x.astype(np.float64), optimize=True)
    resized = np.einsum("niwc,jw->nijc", resized, cols, optimize=True).astype(np.float32)
    return clip_normalize(resized, mean, std)


def vae_pixels(images: np.ndarray) -> np.ndarray:
    """Returns float32 images in [-1, 1] for uint8 `images`."""
    return np.asarray(images, np.float32) / 255 * 2 - 1


# --------------------------------------------------------------------------------------------------
# Encoding (pure, jit-able).


def added_time_ids(fps: float, motion_bucket_id: float, noise_aug_strength: float) -> jax.Array:
    """Returns `[3]` float32: [fps − 1, motion_bucket_id, noise_aug_strength] (fps is the video's frame rate)."""
    return jnp.asarray([fps - 1, motion_bucket_id, noise_aug_strength], jnp.float32)


def encode_keyframes(vae: nnx.Module, image_encoder: nnx.Module, pixels: jax.Array, clip_input: jax.Array,
                     aug_noise: jax.Array, time_ids: jax.Array) -> Conditioning:
    """Returns the Conditioning of keyframes.

    pixels: `[N, H, W, 3]` in [-1, 1]; clip_input: `[N, S, S, 3]` from `clip_pixels`;
    aug_noise: `[N, H, W, 3]` standard normal; time_ids: `[3]` from `added_time_ids` (its last entry is the
    noise augmentation strength).
    """
    n = pixels.shape[0]
    embeds = image_encoder(clip_input)[:, None, :]
    mean_augmented = vae.encode(pixels + time_ids[2] * aug_noise)
    mean_clean = vae.encode(pixels)
    return Conditioning(image_embeds=embeds, image_latent=mean_augmented,
                        clean_latent=vae.config.scaling_factor * mean_clean,
                        added_time_ids=jnp.broadcast_to(time_ids, (n, time_ids.shape[-1])))


def cfg_batch(cond: Conditioning, guided: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (image_embeds, image_latents, added_time_ids) for the UNet batch: `[uncond…, cond…]` if guided.

    The unconditional half has zero image embeddings and zero image latents, and the same time ids.
    """
    if not guided:
        return cond.image_embeds, cond.image_latent, cond.added_time_ids
    return (jnp.concatenate([jnp.zeros_like(cond.image_embeds), cond.image_embeds]),
            jnp.concatenate([jnp.zeros_like(cond.image_latent), cond.image_latent]),
            jnp.concatenate([cond.added_time_ids, cond.added_time_ids]))
