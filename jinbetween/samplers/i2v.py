"""Plain SVD image-to-video: Euler steps of the EDM ODE with per-frame classifier-free guidance."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jinbetween import schedule
from jinbetween.conditioning import Conditioning
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.core import (GuidedSamplerConfig, Move, Sampled, StepProgram, denoise, initial_draw,
                                      per_frame_guidance, run_program)

DENOISE = 0


@dataclasses.dataclass(frozen=True)
class I2VConfig(GuidedSamplerConfig):
    """Static settings of `sample_i2v` (diffusers' defaults)."""

    def program(self) -> StepProgram:
        """One Euler move per step."""
        return StepProgram.build([Move(DENOISE, i) for i in range(self.num_steps)], self.sigmas())


@functools.partial(jax.jit, static_argnames=("cfg",))
def sample_i2v(unet: ModelState[UNet], cond: Conditioning, keys: jax.Array, cfg: I2VConfig,
               noise: jax.Array | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` (scaled VAE space) of videos that start at each keyframe (`Sampled`).

    cond: a batch of B keyframe Conditionings. keys: `[B]` PRNG keys, one per video (the initial noise).
    noise: optional `[B, F, h, w, C]` standard-normal initial draw replacing the keys' (for parity harnesses).
    """
    if noise is None:
        noise = initial_draw(keys, (cfg.num_frames, *cond.image_latent.shape[1:]))
    guidance = (jnp.asarray(per_frame_guidance(cfg.min_guidance_scale, cfg.max_guidance_scale, noise.shape[1]))
                if cfg.guided else None)

    def euler(x, move, fresh):
        return schedule.euler_step(x, denoise(unet, x, move.sigma, cond, guidance), move.sigma, move.sigma_next)

    x = noise * jnp.float32(schedule.init_noise_sigma(cfg.sigma_max))
    return run_program(euler, x, cfg.program(), keys, progress=cfg.progress)
