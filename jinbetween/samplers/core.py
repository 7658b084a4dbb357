"""Shared sampler pieces: the guided UNet evaluation and the x0 estimate, as pure functions."""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween import schedule
from jinbetween.conditioning import Conditioning, cfg_batch
from jinbetween.models.attention import AttnControl
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet

_progress_hook: Callable[[int], None] | None = None


def per_frame_guidance(min_scale: float, max_scale: float, num_frames: int) -> np.ndarray:
    """Returns `[F]` float32 guidance scales linspace(min, max, F): weak at the keyframe, strong at the end."""
    return np.linspace(min_scale, max_scale, num_frames, dtype=np.float32)


def guided_velocity(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array, cond: Conditioning,
                    guidance: jax.Array | None, attn: AttnControl | None = None):
    """Returns the (classifier-free guided) v-prediction `[B, F, h, w, C]` for latents `x [B, F, h, w, C]` at σ.

    `guidance [F]` per frame, or None for a single conditional pass. With `attn` capturing, also
    returns the captured maps (of the `[uncond, cond]` batch).
    """
    embeds, image_latents, time_ids = cfg_batch(cond, guided=guidance is not None)
    scaled = x / jnp.sqrt(sigma**2 + 1)  # scale_model_input
    if guidance is not None:
        scaled = jnp.concatenate([scaled, scaled])
    frames = jnp.broadcast_to(image_latents[:, None], (*scaled.shape[:2], *image_latents.shape[1:]))
    unet_input = jnp.concatenate([scaled, frames], axis=-1)
    c_noise = jnp.broadcast_to(schedule.c_noise(sigma), (unet_input.shape[0],))
    out = unet.merge()(unet_input, c_noise, embeds, time_ids, attn=attn)
    v, maps = out if isinstance(out, tuple) else (out, None)
    if guidance is not None:
        uncond, cond_v = jnp.split(v, 2)
        v = uncond + guidance[None, :, None, None, None] * (cond_v - uncond)
    return v if maps is None else (v, maps)


def denoise(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array, cond: Conditioning,
            guidance: jax.Array | None) -> jax.Array:
    """Returns the x0 estimate `[B, F, h, w, C]` of latents `x` at noise level σ."""
    return schedule.denoised(x, guided_velocity(unet, x, sigma, cond, guidance), sigma)


def report_step(step: jax.Array) -> None:
    """Tells the active `sampling_progress` display that `step` finished (a no-op without one)."""
    jax.debug.callback(lambda i: _progress_hook and _progress_hook(int(i)), step, ordered=True)


@contextlib.contextmanager
def sampling_progress(callback: Callable[[int], None]):
    """Calls `callback(step)` after every sampling step of samplers traced with `progress=True` in this block."""
    global _progress_hook
    previous, _progress_hook = _progress_hook, callback
    try:
        yield
    finally:
        _progress_hook = previous
