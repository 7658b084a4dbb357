"""CFG++ bidirectional moves shared by ViBiD and MPD (both written on Stability's sgm sampler).

Every move evaluates the UNet on the `[uncond; cond]` batch and keeps both x0 estimates: the
conditional one (guidance scale 1) is the new estimate and the unconditional one gives the noise
direction (CFG++: `x' = x̂0 + σ'·(x − x̂0_∅)/σ`). Keyframes enter as hard pins: the clean keyframe
latent replaces an estimate's end frame (the official "DDS" conjugate-gradient solve on a 0/1 frame
mask, which is exactly that replacement). Three kinds of move, at σ → σ':

* SEQUENTIAL, ViBiD's step S(x): forward CFG++ step conditioned on the start keyframe with the last
  frame of x̂0 pinned to z_end; re-noise to σ; the same on the time-flipped latent conditioned on the end
  keyframe with its last frame pinned to z_start; flip back. 2 UNet calls.
* DISTILL, MPD's motion-prior distillation: from the forward estimate only, the backward noise is
  rebuilt frame by frame from the forward per-frame noise differences, anchored so the backward first
  frame denoises to z_end; the distilled x̂0 (backward last frame pinned to z_start) takes a CFG++ step
  with the forward unconditional direction. 1 UNet call; the program re-noises after it.
* PARALLEL, MPD's TRF-like base: forward and backward conditional estimates fused per frame with
  linspace(1, 0), CFG++ step with the forward unconditional direction. 2 UNet calls.

Each move calls the start-conditioned UNet once on x, and the end-conditioned one (when the kind
needs it) under `lax.cond`: a program of any mix of kinds compiles two UNet evaluations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween.conditioning import Conditioning
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.core import (Draws, Sampled, SamplerConfig, cfg_pp_step, denoise_pair, flip_time, fuse,
                                      run_program, start_latents)

SEQUENTIAL, DISTILL, PARALLEL = 0, 1, 2
UNET_CALLS = {SEQUENTIAL: 2, DISTILL: 1, PARALLEL: 2}


def pin_last_frame(x0: jax.Array, keyframe: jax.Array) -> jax.Array:
    """Returns `x0 [B, F, ...]` with its last frame replaced by `keyframe [B, ...]`."""
    return x0.at[:, -1].set(keyframe)


def distilled_estimate(x: jax.Array, x0_forward: jax.Array, sigma: jax.Array, z_start: jax.Array,
                       z_end: jax.Array) -> jax.Array:
    """Returns MPD's distilled x̂0 `[B, F, ...]` in forward order, computed as the paper writes it.

    The backward noise starts at `(x_b[0] − z_end)/σ` and accumulates the negated, time-reversed
    differences of the forward per-frame noise; x̂0_b = x_b − σ·ε_b, its last frame pinned to z_start.
    (The sum telescopes: the result is x0_forward + (z_end − x0_forward[-1]) with frame 0 = z_start.)
    """
    eps_forward = (x - x0_forward) * (1 / sigma)
    motion = eps_forward[:, 1:] - eps_forward[:, :-1]
    x_backward = flip_time(x)
    anchor = (x_backward[:, :1] - z_end[:, None]) * (1 / sigma)
    eps_backward = jnp.concatenate([anchor, anchor + jnp.cumsum(-flip_time(motion), axis=1)], axis=1)
    x0_backward = pin_last_frame(x_backward - sigma * eps_backward, z_start)
    return flip_time(x0_backward)


def sample_bidirectional(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array,
                         cfg: SamplerConfig, draws: Draws | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` after running `cfg.program()` (moves of the kinds above), as `Sampled`;
    call under jit."""
    z_start, z_end = start.clean_latent, end.clean_latent
    blend = jnp.asarray(np.linspace(1, 0, cfg.num_frames, dtype=np.float32))

    def move(x, row, fresh):
        sigma, sigma_next = row.sigma, row.sigma_next
        uncond, x0 = denoise_pair(unet, x, sigma, start)
        distilled = cfg_pp_step(distilled_estimate(x, x0, sigma, z_start, z_end), x, uncond, sigma, sigma_next)
        forward_half = (cfg_pp_step(pin_last_frame(x0, z_end), x, uncond, sigma, sigma_next)
                        + jnp.sqrt(sigma**2 - sigma_next**2) * fresh)
        y = jnp.where(row.kind == SEQUENTIAL, forward_half, x)
        uncond_b, x0_b = jax.lax.cond(row.kind == DISTILL, lambda: (jnp.zeros_like(y), jnp.zeros_like(y)),
                                      lambda: denoise_pair(unet, flip_time(y), sigma, end))
        sequential = flip_time(cfg_pp_step(pin_last_frame(x0_b, z_start), flip_time(y), uncond_b, sigma,
                                           sigma_next))
        parallel = cfg_pp_step(fuse(x0, x0_b, blend, 1 - blend), x, uncond, sigma, sigma_next)
        return jnp.select([row.kind == SEQUENTIAL, row.kind == DISTILL], [sequential, distilled], parallel)

    return run_program(move, start_latents(keys, start, cfg, draws), cfg.program(), keys,
                       None if draws is None else draws.moves, progress=cfg.progress, move_uses_noise=True)
