"""The denoiser: SVD's UNet as an EDM v-prediction denoiser, shared by the samplers, the fine-tune and the toy-world
training.

EDM preconditioning (input scale c_in, noise conditioning c_noise, v → x0), classifier-free guided evaluations,
GI's paired evaluation (a forward pass whose temporal attention maps, rotated by 180°, replace those of a backward
pass on the time-reversed latent) and the EDM-weighted x0 loss. Every function is pure; the UNet comes in as a
`ModelState` and always returns `(v, maps)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinbetween.conditioning import Conditioning, cfg_batch
from jinbetween.models.attention import AttnControl, rot180
from jinbetween.models.state import ModelState
from jinbetween.models.unet import Maps, UNet

# --------------------------------------------------------------------------------------------------
# EDM preconditioning of a v-prediction model (diffusers' EulerDiscreteScheduler with v-prediction).


def c_in(sigma: jax.Array) -> jax.Array:
    """Returns the input scale 1/√(σ² + 1) (diffusers' `scale_model_input`)."""
    return 1 / jnp.sqrt(sigma**2 + 1)


def c_noise(sigma: jax.Array) -> jax.Array:
    """Returns the UNet's noise conditioning 0.25·ln σ (diffusers' continuous "timestep")."""
    return 0.25 * jnp.log(sigma)


def denoised(x: jax.Array, v: jax.Array, sigma: jax.Array) -> jax.Array:
    """Returns x0 = c_out·v + c_skip·x for v-prediction (c_out = −σ/√(σ²+1), c_skip = 1/(σ²+1))."""
    return v * (-sigma / jnp.sqrt(sigma**2 + 1)) + x * (1 / (sigma**2 + 1))


# --------------------------------------------------------------------------------------------------
# Time flips and per-frame weights.


def flip_time(x: jax.Array) -> jax.Array:
    """Returns `x [B, F, ...]` with its frames in reverse order."""
    return jnp.flip(x, axis=1)


def per_frame(weights: jax.Array, like: jax.Array) -> jax.Array:
    """Returns `weights [F]` shaped to broadcast against `like [B, F, ...]`."""
    return jnp.reshape(weights, (1, -1) + (1,) * (like.ndim - 2))


def fuse(forward: jax.Array, backward: jax.Array, forward_weights: jax.Array,
         backward_weights: jax.Array) -> jax.Array:
    """Returns `w_f ⊙ forward + w_b ⊙ flip(backward)`: a forward-order path fused with a backward-order one.

    forward, backward: `[B, F, ...]`, each in its own frame order. Weights `[F]` in output (forward) order.
    """
    return per_frame(forward_weights, forward) * forward + per_frame(backward_weights, backward) * flip_time(backward)


# --------------------------------------------------------------------------------------------------
# Evaluations.


def unet_input(x: jax.Array, sigma: jax.Array, image_latents: jax.Array) -> jax.Array:
    """Returns the UNet input `[B, F, h, w, 2C]`: latents `x [B, F, h, w, C]` scaled by c_in(σ) (σ scalar or `[B]`),
    then each video's conditioning latent `image_latents [B, h, w, C]` on every frame."""
    scaled = x * c_in(jnp.broadcast_to(sigma, x.shape[:1])).reshape(-1, 1, 1, 1, 1)
    frames = jnp.broadcast_to(image_latents[:, None], (*scaled.shape[:2], *image_latents.shape[1:]))
    return jnp.concatenate([scaled, frames], axis=-1)


def velocity(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array, cond: Conditioning, *, guided: bool = False,
             attn: AttnControl | None = None, sigma_in: jax.Array | None = None,
             remat: bool = False) -> tuple[jax.Array, Maps]:
    """Returns the UNet's (v, maps) for latents `x [B, F, h, w, C]` at σ: v of `[uncond; cond]` (2B rows) if
    guided, else B rows; maps empty unless `attn` captures.

    σ is a scalar or one per clip `[B]`. `sigma_in` (default σ) sets the input scale 1/√(σ_in² + 1). `remat`
    rematerializes per UNet block when differentiated.
    """
    embeds, image_latents, time_ids = cfg_batch(cond, guided=guided)
    per_clip = lambda s: jnp.broadcast_to(s, x.shape[:1])  # noqa: E731
    scale_sigma, noise = per_clip(sigma if sigma_in is None else sigma_in), c_noise(per_clip(sigma))
    if guided:
        x, scale_sigma, noise = (jnp.concatenate([a, a]) for a in (x, scale_sigma, noise))
    model_input = unet_input(x, scale_sigma, image_latents)
    return unet.merge()(model_input, noise, embeds, time_ids, attn=attn, remat=remat)


def guide(v: jax.Array, guidance: jax.Array) -> jax.Array:
    """Returns the classifier-free guided v `uncond + w·(cond − uncond)` of a `[uncond; cond]` v, `guidance [F]`."""
    uncond, cond_v = jnp.split(v, 2)
    return uncond + per_frame(guidance, uncond) * (cond_v - uncond)


def guided_velocity(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array, cond: Conditioning,
                    guidance: jax.Array | None, *, attn: AttnControl | None = None,
                    sigma_in: jax.Array | None = None) -> tuple[jax.Array, Maps]:
    """Returns the (classifier-free guided) v `[B, F, h, w, C]` for latents `x [B, F, h, w, C]` at σ, and the maps
    captured (of the `[uncond; cond]` batch when guided). `guidance [F]` per frame, or None for one conditional
    pass."""
    v, maps = velocity(unet, x, sigma, cond, guided=guidance is not None, attn=attn, sigma_in=sigma_in)
    return (v if guidance is None else guide(v, guidance)), maps


def denoise(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array, cond: Conditioning,
            guidance: jax.Array | None) -> jax.Array:
    """Returns the x0 estimate `[B, F, h, w, C]` of latents `x` at noise level σ."""
    v, _ = guided_velocity(unet, x, sigma, cond, guidance)
    return denoised(x, v, sigma)


def denoise_pair(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array,
                 cond: Conditioning) -> tuple[jax.Array, jax.Array]:
    """Returns `(x0_uncond, x0_cond)`, each `[B, F, h, w, C]`, from one UNet call on the `[uncond; cond]` batch."""
    v, _ = velocity(unet, x, sigma, cond, guided=True)
    uncond, cond_v = jnp.split(v, 2)
    return denoised(x, uncond, sigma), denoised(x, cond_v, sigma)


def paired_velocity(forward: ModelState[UNet], backward: ModelState[UNet], x: jax.Array, sigma: jax.Array,
                    start: Conditioning, end: Conditioning, guidance: jax.Array | None = None, *,
                    remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns GI's pair (v_forward of `x`, v_backward of `flip_time(x)`), each in its own frame order.

    The forward model, conditioned on `start`, captures its temporal self-attention maps; the backward model,
    conditioned on `end`, uses them rotated by 180° in place of its own (no gradient flows into the maps).
    `remat` applies to the backward pass.
    """
    v_forward, maps = guided_velocity(forward, x, sigma, start, guidance, attn=AttnControl.capture())
    inject = AttnControl.inject(jax.lax.stop_gradient(rot180(maps)))
    flipped = flip_time(x)
    v_backward, _ = velocity(backward, flipped, sigma, end, guided=guidance is not None, attn=inject, remat=remat)
    return v_forward, (v_backward if guidance is None else guide(v_backward, guidance))


# --------------------------------------------------------------------------------------------------
# Training.


def x0_error(x0: jax.Array, target: jax.Array) -> jax.Array:
    """Returns `[B]`: each clip's mean squared error of the estimates `x0` against the clean latents `target`."""
    return jnp.mean((x0 - target) ** 2, axis=tuple(range(1, x0.ndim)))


def edm_loss(x0: jax.Array, target: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (the EDM-weighted x0 loss mean((1 + σ²)/σ² · error), error `[B]` from `x0_error`), for estimates
    `x0` and clean latents `target` `[B, F, h, w, C]` at noise levels `sigma [B]`."""
    error = x0_error(x0, target)
    return jnp.mean((1 + sigma**2) / sigma**2 * error), error
