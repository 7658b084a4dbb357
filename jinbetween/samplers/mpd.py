"""MPD, Motion Prior Distillation (Jeon et al., ICLR 2026): the backward path distilled from the forward one.

During the first steps (i < γ·N) each step first runs k DISTILL moves of `samplers.bidirectional` —
only the start-conditioned UNet is evaluated; the backward estimate is the forward one shifted so
that it ends at the end keyframe, and the latent is re-noised to σ after each — and then one
SEQUENTIAL (ViBiD) move. Afterwards the base sampler takes over: SEQUENTIAL moves for MPD-seq
(γ = 0.2, k = 3), or for MPD-par (γ = 0.1, k = 1) the TRF-like PARALLEL move repeated
`parallel_repeats + 1` times per step with re-noising after all but the last. As in the official
`mpd_par.py` / `mpd_seq.py`; the video is conditioned with fps 9 (fps_id 8).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from jinbetween import checks
from jinbetween.conditioning import Conditioning
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.bidirectional import DISTILL, PARALLEL, SEQUENTIAL, sample_bidirectional
from jinbetween.samplers.core import Draws, Move, Sampled, SamplerConfig, StepProgram, renoise_std

BASES = ("parallel", "sequential")


@dataclasses.dataclass(frozen=True)
class MPDConfig(SamplerConfig):
    """Static settings of `sample_mpd`; `MPDConfig()` is MPD-par, `MPDConfig.sequential()` MPD-seq.

    distill_fraction γ: steps i < γ·num_steps distill. distill_iterations k: DISTILL moves per such step.
    parallel_repeats: re-noised PARALLEL moves per later step (then one more without re-noising).
    """

    base: str = "parallel"
    distill_fraction: float = 0.1
    distill_iterations: int = 1
    parallel_repeats: int = 3

    MIN_FRAMES = 3

    def __post_init__(self):
        super().__post_init__()
        checks.choice(self.base, "base", BASES, "the base sampler")
        checks.number(self.distill_fraction, "distill_fraction", "the fraction of steps that distill", minimum=0,
                      maximum=1, example=0.1)
        checks.integer(self.distill_iterations, "distill_iterations", "the distillation moves per step", minimum=0,
                       example=1)
        checks.integer(self.parallel_repeats, "parallel_repeats", "the re-noised moves per step", minimum=0,
                       example=3)

    @classmethod
    def sequential(cls, **overrides) -> "MPDConfig":
        """MPD-seq defaults: ViBiD base, γ = 0.2, k = 3."""
        return cls(**{"base": "sequential", "distill_fraction": 0.2, "distill_iterations": 3, **overrides})

    def program(self) -> StepProgram:
        sigmas = self.sigmas()
        moves = []
        for i in range(self.num_steps):
            back_to_sigma = renoise_std(sigmas, i + 1, i)
            if i < self.distill_fraction * self.num_steps:
                moves += [Move(DISTILL, i, noise_after=back_to_sigma)] * self.distill_iterations
                moves.append(Move(SEQUENTIAL, i))
            elif self.base == "sequential":
                moves.append(Move(SEQUENTIAL, i))
            else:
                moves += [Move(PARALLEL, i, noise_after=back_to_sigma)] * self.parallel_repeats
                moves.append(Move(PARALLEL, i))
        return StepProgram.build(moves, sigmas)


@functools.partial(jax.jit, static_argnames=("cfg",))
def sample_mpd(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array, cfg: MPDConfig,
               draws: Draws | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` of videos from each start keyframe to its end keyframe (`Sampled`)."""
    return sample_bidirectional(unet, start, end, keys, cfg, draws)
