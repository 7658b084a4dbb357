"""MPD, Motion Prior Distillation (Jeon et al., ICLR 2026): the backward path distilled from the forward one.

During the first steps (i < γ·N) each step first runs k distillation moves — only the start-conditioned
UNet is evaluated; the backward estimate is the forward one shifted so that it ends at the end keyframe,
and the latent is re-noised to σ after each — and then one ViBiD step S(x). Afterwards the base sampler
takes over: ViBiD steps for MPD-seq (γ = 0.2, k = 3), or for MPD-par (γ = 0.1, k = 1) the TRF-like parallel
move repeated `parallel_repeats + 1` times per step with re-noising after all but the last. As in the official
`mpd_par.py` / `mpd_seq.py`; the video is conditioned with fps 9 (fps_id 8).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween import checks
from jinbetween.conditioning import Conditioning
from jinbetween.denoiser import flip_time, fuse
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers import vibid
from jinbetween.samplers.bidirectional import (Estimates, Keyframes, PairedMove, pin_last_frame, sample_bidirectional,
                                               unchanged)
from jinbetween.samplers.core import (Draws, Move, Progress, Sampled, SamplerConfig, StepProgram, cfg_pp_step,
                                      refuse_delta, renoise_std)

SEQUENTIAL, DISTILL, PARALLEL = 0, 1, 2
UNET_CALLS = {SEQUENTIAL: 2, DISTILL: 1, PARALLEL: 2}
BASES = ("parallel", "sequential")


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


def distillation_move(x: jax.Array, y: jax.Array, forward: Estimates, backward: Estimates, move: StepProgram,
                      keyframes: Keyframes) -> jax.Array:
    """Returns MPD's motion-prior distillation σ → σ': the distilled estimate (from the forward one alone) takes a
    CFG++ step along the forward unconditional direction; the program re-noises after it."""
    x0 = distilled_estimate(x, forward.cond, move.sigma, keyframes.start, keyframes.end)
    return cfg_pp_step(x0, x, forward.uncond, move.sigma, move.sigma_next)


def parallel_move(x: jax.Array, y: jax.Array, forward: Estimates, backward: Estimates, move: StepProgram,
                  keyframes: Keyframes) -> jax.Array:
    """Returns MPD-par's base move σ → σ': the forward and backward conditional estimates fused per frame with
    linspace(1, 0), then a CFG++ step along the forward unconditional direction."""
    blend = jnp.asarray(np.linspace(1, 0, x.shape[1], dtype=np.float32))
    return cfg_pp_step(fuse(forward.cond, backward.cond, blend, 1 - blend), x, forward.uncond, move.sigma,
                       move.sigma_next)


MOVES = {SEQUENTIAL: vibid.STEP, DISTILL: PairedMove(unchanged, distillation_move, backward=False),
         PARALLEL: PairedMove(unchanged, parallel_move, backward=True)}


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


@functools.partial(jax.jit, static_argnames=("cfg", "progress"))
def sample_mpd(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array, cfg: MPDConfig, *,
               delta: None = None, draws: Draws | None = None, progress: Progress | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` of videos from each start keyframe to its end keyframe (`Sampled`).

    delta: MPD has no backward model (None). draws: inject every random draw. progress: called with each move's
    index on the host.
    """
    refuse_delta(delta, "MPD")
    return sample_bidirectional(unet, start, end, keys, cfg, tuple(MOVES[k] for k in sorted(MOVES)), draws, progress)
