"""TRF, Time Reversal Fusion (Feng et al., ECCV 2024): fuse a forward and a time-reversed SVD path.

Each denoising move runs two guided Euler steps of the same latent: forward in time conditioned on the
start keyframe, and on the time-flipped latent conditioned on the end keyframe, each with per-frame
guidance linspace(min, max) in its own frame order. The post-step latents are blended per frame with
linspace(1, 0) (again each in its own order) and summed. A RePaint-style jump schedule re-noises the
latent after the first steps and denoises that stretch again. Defaults are those of the official
`svd_sequential_re.py`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween import checks, schedule
from jinbetween.conditioning import Conditioning
from jinbetween.denoiser import denoised, flip_time, fuse, guided_velocity
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.core import (Draws, GuidedSamplerConfig, Move, Progress, Sampled, StepProgram,
                                      per_frame_guidance, refuse_delta, sample_program)

DENOISE = 0
UNET_CALLS = {DENOISE: 2}


def jump_schedule(num_steps: int, repeat_step_ratio: float, jump_length: int, jump_n_sample: int) -> list[int]:
    """Returns the visited schedule indices: down from 0, jumping back `jump_length` at each jump point.

    Jump points (in reversed index t = N−1−k) are `range(int(N·ratio), N − L, L)`, each jumped
    `jump_n_sample − 1` times. A visited index below its predecessor is a re-noising ("undo") move.
    With the defaults (50, 0.8, 5, 2): 0..9, 8, 7, 6, 5, 4, 5, 6, ..., 49.
    """
    jumps = {t: jump_n_sample - 1 for t in range(int(num_steps * repeat_step_ratio), num_steps - jump_length,
                                                 jump_length)}
    reversed_visits, t = [], num_steps
    while t >= 1:
        t -= 1
        reversed_visits.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                reversed_visits.append(t)
    return [num_steps - 1 - t for t in reversed_visits]


@dataclasses.dataclass(frozen=True)
class TRFConfig(GuidedSamplerConfig):
    """Static settings of `sample_trf`.

    faithful: reproduce the official pipeline's stale input scaling: on the first denoising move after
    a jump its UNet input is scaled with c_in of the σ following the previous denoising move (σ10
    instead of σ5 at the defaults, ~2× too large), because `scale_model_input` reads the scheduler's
    step index before the pipeline sets it. Off by default (the mathematically intended sampler). The
    official runs' other deviation, diffusers 0.24's CFG-half mix-up in the temporal cross-attention
    context, is not reproduced: the UNet here always uses the corrected (batch-major) order.
    """

    num_steps: int = 50
    jump_length: int = 5
    jump_n_sample: int = 2
    repeat_step_ratio: float = 0.8
    noise_scale_ratio: float = 1.0
    faithful: bool = False

    MIN_FRAMES = 3

    def __post_init__(self):
        super().__post_init__()
        checks.integer(self.jump_length, "jump_length", "the steps of a jump back", minimum=1, example=5)
        checks.integer(self.jump_n_sample, "jump_n_sample", "the passes over a jumped stretch", minimum=1, example=2)
        checks.number(self.repeat_step_ratio, "repeat_step_ratio", "the fraction of steps before the jumps",
                      minimum=0, maximum=1, example=0.8)
        checks.number(self.noise_scale_ratio, "noise_scale_ratio", "the scale of the jumps' noise", minimum=0,
                      example=1.0)
        checks.boolean(self.faithful, "faithful", "faithful")

    def program(self) -> StepProgram:
        """One fused move per denoising visit; a run of undo visits becomes the next move's `noise_before`.

        Consecutive undos from σ[a] up to σ[b] add noise of variance ratio²·Σ(σ_j² − σ_{j+1}²) =
        ratio²·(σ_b² − σ_a²): one draw of that size, the same distribution as the reference's several.
        """
        sigmas = self.sigmas().astype(np.float64)
        visits = jump_schedule(self.num_steps, self.repeat_step_ratio, self.jump_length, self.jump_n_sample)
        moves, last, variance, last_denoised = [], visits[0] - 1, 0.0, None
        for k in visits:
            if k > last:
                stale = last_denoised + 1 if self.faithful and last_denoised is not None else k
                moves.append(Move(DENOISE, k, noise_before=self.noise_scale_ratio * float(np.sqrt(variance)),
                                  input_step=stale))
                variance, last_denoised = 0.0, k
            else:
                variance += sigmas[last] ** 2 - sigmas[last + 1] ** 2
            last = k
        return StepProgram.build(moves, sigmas)

    def guidance(self) -> np.ndarray:
        return per_frame_guidance(self.min_guidance_scale, self.max_guidance_scale, self.num_frames)

    def blend_weights(self) -> np.ndarray:
        """`[F]` linspace(1, 0): each path's weights in its own frame order."""
        return np.linspace(1, 0, self.num_frames, dtype=np.float32)


def guided_euler_step(unet: ModelState[UNet], x: jax.Array, cond: Conditioning, move: StepProgram,
                      guidance: jax.Array | None) -> jax.Array:
    """Returns x at σ_next after one guided Euler step of `x [B, F, h, w, C]` conditioned on `cond`."""
    v, _ = guided_velocity(unet, x, move.sigma, cond, guidance, sigma_in=move.sigma_in)
    return schedule.euler_step(x, denoised(x, v, move.sigma), move.sigma, move.sigma_next)


def fused_move(unet: ModelState[UNet], x: jax.Array, move: StepProgram, start: Conditioning, end: Conditioning,
               guidance: jax.Array | None, weights: jax.Array) -> jax.Array:
    """Returns TRF's fused move of `x`: a forward Euler step from the start keyframe and one of the time-flipped
    latent from the end keyframe, blended per frame with `weights [F]` (each path in its own frame order)."""
    forward = guided_euler_step(unet, x, start, move, guidance)
    backward = guided_euler_step(unet, flip_time(x), end, move, guidance)
    return fuse(forward, backward, weights, jnp.flip(weights))


@functools.partial(jax.jit, static_argnames=("cfg", "progress"))
def sample_trf(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array, cfg: TRFConfig, *,
               delta: None = None, draws: Draws | None = None, progress: Progress | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` of videos from each start keyframe to its end keyframe (`Sampled`).

    start, end: B keyframe Conditionings. keys: `[B]`, one per video. delta: TRF has no backward model (None).
    draws: inject every random draw. progress: called with each move's index on the host.
    """
    refuse_delta(delta, "TRF")
    guidance = jnp.asarray(cfg.guidance()) if cfg.guided else None
    weights = jnp.asarray(cfg.blend_weights())

    def move(x, row, fresh):
        return fused_move(unet, x, row, start, end, guidance, weights)

    return sample_program(move, keys, start, cfg, draws, progress)
