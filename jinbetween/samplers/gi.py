"""GI, Generative Inbetweening (Wang et al., ICLR 2025): dual-directional sampling with rotated attention maps.

At every evaluation the forward UNet, conditioned on the start keyframe, captures the probabilities of
its 16 temporal self-attention layers; the backward UNet (the same parameters plus a delta on those
layers' W_v and W_o) denoises the time-reversed latent, conditioned on the end keyframe, with the
180°-rotated maps in place of its own. The two v-predictions are fused (w = 0.5), an Euler step
follows, and during the first half of the steps each step is repeated after re-noising (noise
re-injection). Defaults are those of the official `keyframe_interpolation.sh`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween import checks, schedule
from jinbetween.conditioning import Conditioning
from jinbetween.denoiser import denoised, fuse, paired_velocity
from jinbetween.models.delta import Delta, with_delta
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.core import (Draws, GuidedSamplerConfig, Move, Progress, Sampled, StepProgram,
                                      per_frame_guidance, renoise_std, sample_program)

DENOISE = 0
UNET_CALLS = {DENOISE: 2}


@dataclasses.dataclass(frozen=True)
class GIConfig(GuidedSamplerConfig):
    """Static settings of `sample_gi`.

    weighted_average: per-frame guidance linspace(min, max) and linear fusion weights linspace(1, 0)
    (the official `--weighted_average`); off by default, which averages the guidance with its reverse
    (a constant (min + max)/2 for every frame) and fuses with w = 0.5. fusion_weight: a constant
    forward weight that overrides both (1.0 gives forward-only sampling, for ablations and tests).
    noise_injection_steps R: each of the first `int(num_steps · noise_injection_ratio)` steps is
    re-run R times, each time after adding noise from σ_{i+1} back to σ_i.
    """

    num_steps: int = 50
    weighted_average: bool = False
    fusion_weight: float | None = None
    noise_injection_steps: int = 5
    noise_injection_ratio: float = 0.5

    MIN_FRAMES = 3

    def __post_init__(self):
        super().__post_init__()
        checks.boolean(self.weighted_average, "weighted_average", "weighted_average")
        if self.fusion_weight is not None:
            checks.number(self.fusion_weight, "fusion_weight", "the forward path's weight", minimum=0, maximum=1,
                          example=0.5)
        checks.integer(self.noise_injection_steps, "noise_injection_steps", "the re-noised repeats of each early "
                       "step", minimum=0, example=5)
        checks.number(self.noise_injection_ratio, "noise_injection_ratio", "the fraction of steps repeated",
                      minimum=0, maximum=1, example=0.5)

    def program(self) -> StepProgram:
        """Each step once, then (in the first half) `noise_injection_steps` re-noised repeats of it."""
        sigmas = self.sigmas()
        moves = []
        for i in range(self.num_steps):
            moves.append(Move(DENOISE, i))
            if i < int(self.num_steps * self.noise_injection_ratio):
                moves += [Move(DENOISE, i, noise_before=renoise_std(sigmas, i + 1, i))] * self.noise_injection_steps
        return StepProgram.build(moves, sigmas)

    def guidance(self) -> np.ndarray:
        """`[F]` guidance scales of both paths (each in its own frame order)."""
        scales = per_frame_guidance(self.min_guidance_scale, self.max_guidance_scale, self.num_frames)
        return scales if self.weighted_average else (scales + scales[::-1]) / 2

    def fusion_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(forward, backward) weights `[F]` in output order."""
        if self.fusion_weight is not None:
            forward = np.full(self.num_frames, self.fusion_weight, np.float32)
        elif self.weighted_average:
            forward = np.linspace(1, 0, self.num_frames, dtype=np.float32)
        else:
            forward = np.full(self.num_frames, 0.5, np.float32)
        return forward, (1 - forward).astype(np.float32)


def fused_euler_step(unet: ModelState[UNet], backward_unet: ModelState[UNet], x: jax.Array, move: StepProgram,
                     start: Conditioning, end: Conditioning, guidance: jax.Array | None,
                     weights: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Returns x at σ_next after GI's step from σ: the forward and the backward (maps-rotated) v fused per frame, then
    one Euler step of the fused x0 estimate."""
    v_forward, v_backward = paired_velocity(unet, backward_unet, x, move.sigma, start, end, guidance)
    v = fuse(v_forward, v_backward, *weights)
    return schedule.euler_step(x, denoised(x, v, move.sigma), move.sigma, move.sigma_next)


@functools.partial(jax.jit, static_argnames=("cfg", "progress"))
def sample_gi(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array, cfg: GIConfig, *,
              delta: Delta | None = None, draws: Draws | None = None, progress: Progress | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` of videos from each start keyframe to its end keyframe (`Sampled`).

    start, end: B keyframe Conditionings. keys: `[B]`, one per video. delta: the backward model's W_v/W_o delta
    (`jinbetween.models.delta`); None uses the base weights for the backward path (the paper's "w/o
    fine-tuning" ablation). draws: inject every random draw (`core.draws_from_keys` layout). progress: called
    with each move's index on the host.
    """
    backward_unet = with_delta(unet, delta)
    guidance = jnp.asarray(cfg.guidance()) if cfg.guided else None
    weights = tuple(jnp.asarray(w) for w in cfg.fusion_weights())

    def move(x, row, fresh):
        return fused_euler_step(unet, backward_unet, x, row, start, end, guidance, weights)

    return sample_program(move, keys, start, cfg, draws, progress)
