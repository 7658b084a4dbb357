"""Plain SVD image-to-video: Euler steps of the EDM ODE with per-frame classifier-free guidance."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jinbetween import schedule
from jinbetween.conditioning import Conditioning
from jinbetween.denoiser import denoise
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.core import (Draws, GuidedSamplerConfig, Move, Progress, Sampled, StepProgram,
                                      per_frame_guidance, sample_program)

DENOISE = 0


@dataclasses.dataclass(frozen=True)
class I2VConfig(GuidedSamplerConfig):
    """Static settings of `sample_i2v` (diffusers' defaults)."""

    def program(self) -> StepProgram:
        """One Euler move per step."""
        return StepProgram.build([Move(DENOISE, i) for i in range(self.num_steps)], self.sigmas())


def euler_step(unet: ModelState[UNet], x: jax.Array, cond: Conditioning, move: StepProgram,
               guidance: jax.Array | None) -> jax.Array:
    """Returns x at σ_next after one guided Euler step of `x [B, F, h, w, C]` conditioned on `cond`."""
    return schedule.euler_step(x, denoise(unet, x, move.sigma, cond, guidance), move.sigma, move.sigma_next)


@functools.partial(jax.jit, static_argnames=("cfg", "progress"))
def sample_i2v(unet: ModelState[UNet], cond: Conditioning, keys: jax.Array, cfg: I2VConfig,
               noise: jax.Array | None = None, *, progress: Progress | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` (scaled VAE space) of videos that start at each keyframe (`Sampled`).

    cond: a batch of B keyframe Conditionings. keys: `[B]` PRNG keys, one per video (the initial noise).
    noise: optional `[B, F, h, w, C]` standard-normal initial draw replacing the keys' (for parity harnesses).
    progress: called with each move's index on the host.
    """
    guidance = (jnp.asarray(per_frame_guidance(cfg.min_guidance_scale, cfg.max_guidance_scale, cfg.num_frames))
                if cfg.guided else None)

    def move(x, row, fresh):
        return euler_step(unet, x, cond, row, guidance)

    return sample_program(move, keys, cond, cfg, None if noise is None else Draws(noise, None), progress)
