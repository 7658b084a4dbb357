"""ViBiDSampler (Yang, Kwon, Ye; ICLR 2025): sequential bidirectional sampling with CFG++ and keyframe pins.

Every step is the paper's S(x) at σ → σ': a forward CFG++ step from the start keyframe (estimate's last frame
pinned to the end keyframe), re-noising back to σ, then the same on the time-reversed latent from the end
keyframe (last frame pinned to the start keyframe), flipped back. No fusion, guidance scale 1 (guidance enters
through the unconditional noise direction only). 2 UNet calls per step. Defaults are those of the official
`vibidsampler.py`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jinbetween.conditioning import Conditioning
from jinbetween.denoiser import flip_time
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.bidirectional import Estimates, Keyframes, PairedMove, pin_last_frame, sample_bidirectional
from jinbetween.samplers.core import (Draws, Move, Progress, Sampled, SamplerConfig, StepProgram, cfg_pp_step,
                                      refuse_delta)

SEQUENTIAL = 0
UNET_CALLS = {SEQUENTIAL: 2}


def forward_half(x: jax.Array, forward: Estimates, move: StepProgram, fresh: jax.Array,
                 keyframes: Keyframes) -> jax.Array:
    """Returns the first half of S(x): the CFG++ step σ → σ' from the start keyframe, its estimate's last frame pinned
    to the end keyframe, re-noised back to σ with `fresh`."""
    sigma, sigma_next = move.sigma, move.sigma_next
    stepped = cfg_pp_step(pin_last_frame(forward.cond, keyframes.end), x, forward.uncond, sigma, sigma_next)
    return stepped + jnp.sqrt(sigma**2 - sigma_next**2) * fresh


def backward_half(x: jax.Array, y: jax.Array, forward: Estimates, backward: Estimates, move: StepProgram,
                  keyframes: Keyframes) -> jax.Array:
    """Returns the second half of S(x): the CFG++ step σ → σ' of the time-reversed `y` from the end keyframe, its
    estimate's last frame pinned to the start keyframe, flipped back to forward order."""
    stepped = cfg_pp_step(pin_last_frame(backward.cond, keyframes.start), flip_time(y), backward.uncond, move.sigma,
                          move.sigma_next)
    return flip_time(stepped)


STEP = PairedMove(forward_half, backward_half, backward=True)  # S(x)


@dataclasses.dataclass(frozen=True)
class ViBiDConfig(SamplerConfig):
    """Static settings of `sample_vibid`."""

    MIN_FRAMES = 3

    def program(self) -> StepProgram:
        """One step S(x) per σ."""
        return StepProgram.build([Move(SEQUENTIAL, i) for i in range(self.num_steps)], self.sigmas())


@functools.partial(jax.jit, static_argnames=("cfg", "progress"))
def sample_vibid(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array, cfg: ViBiDConfig,
                 *, delta: None = None, draws: Draws | None = None, progress: Progress | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` of videos from each start keyframe to its end keyframe (`Sampled`).

    delta: ViBiD has no backward model (None). draws: inject every random draw. progress: called with each move's
    index on the host.
    """
    refuse_delta(delta, "ViBiD")
    return sample_bidirectional(unet, start, end, keys, cfg, (STEP,), draws, progress)
