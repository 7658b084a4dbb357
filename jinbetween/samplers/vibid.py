"""ViBiDSampler (Yang, Kwon, Ye; ICLR 2025): sequential bidirectional sampling with CFG++ and keyframe pins.

Every step is one SEQUENTIAL move of `samplers.bidirectional`: a forward CFG++ step from the start
keyframe (estimate's last frame pinned to the end keyframe), re-noising back to σ, then the same on
the time-reversed latent from the end keyframe. No fusion, guidance scale 1 (guidance enters through
the unconditional noise direction only). Defaults are those of the official `vibidsampler.py`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from jinbetween.conditioning import Conditioning
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.bidirectional import SEQUENTIAL, sample_bidirectional
from jinbetween.samplers.core import Draws, Move, Sampled, SamplerConfig, StepProgram


@dataclasses.dataclass(frozen=True)
class ViBiDConfig(SamplerConfig):
    """Static settings of `sample_vibid`."""

    MIN_FRAMES = 3

    def program(self) -> StepProgram:
        """One sequential move per step."""
        return StepProgram.build([Move(SEQUENTIAL, i) for i in range(self.num_steps)], self.sigmas())


@functools.partial(jax.jit, static_argnames=("cfg",))
def sample_vibid(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array,
                 cfg: ViBiDConfig, draws: Draws | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` of videos from each start keyframe to its end keyframe (`Sampled`)."""
    return sample_bidirectional(unet, start, end, keys, cfg, draws)
