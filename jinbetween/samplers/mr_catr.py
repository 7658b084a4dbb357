"""MR-CATR (ICML 2026): ViBiD's sequential step with a conflict-aware backward update in the first steps.

Every step is ViBiD's S(x) (`samplers.bidirectional`, SEQUENTIAL): a forward CFG++ step from the start
keyframe with the estimate's last frame pinned to z_end, re-noising back to σ, then the same on the
time-reversed latent from the end keyframe with its last frame pinned to z_start. During the first steps
(i < γ·N, γ = 0.2) the backward update d = S_b(x_b) − x_b is blended with its projection on a motion axis:

1. motion axis of an x0 estimate e `[F, ...]`: the mean of its frame residuals e[t+1] − e[t], the same for
   every frame, as one unit vector over the whole video;
2. m_start: the axis of the forward estimate in backward frame order, m_end: the backward estimate's (both
   before their pins); consensus m = normalize((1 − κ)·m_start + κ·m_end) if cos(m_start, m_end) ≥ 0, else m_start;
3. P d = (d·m)·m; s = max(cos(d, P d), 0); ρ = 1 − clip(σ_i/σ_0, 0, 1)^p; β = ρ·s;
   x_b ← x_b + (1 − β)·d + β·P d.

At the defaults (25 steps, γ = 0.2, κ = 0.2, p = 2, fps 11 i.e. fps_id 10) steps 0–4 blend, step 0 with ρ = 0.
As the official `svd/scripts/sampling/mrcatr.py`: every norm and cosine carries its ε = 1e-8 where it does
(√(Σv² + ε), v/(‖v‖ + ε), a·b/(‖a‖‖b‖ + ε)); reductions run per video (the official script runs one).

Its oddities are the default, not options: the mean residual is the endpoint difference over F − 1, cos(d, P d)
is never negative, and the projection is one rank-one map of the whole video. The authors' diagnostics script
copies these helpers "so diagnostics match the paper", and nothing says what else was meant
(docs/mr_catr_algorithm.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween import checks
from jinbetween.conditioning import Conditioning
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.bidirectional import pin_last_frame
from jinbetween.samplers.core import (Draws, Move, Sampled, SamplerConfig, StepProgram, cfg_pp_step, denoise_pair,
                                      flip_time, run_program, start_latents)

PLAIN, CONFLICT_AWARE = 0, 1  # move kinds: ViBiD's S(x); S(x) with the conflict-aware backward update
UNET_CALLS = {PLAIN: 2, CONFLICT_AWARE: 2}
EPS = 1e-8

Denoiser = Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # x [B, F, ...] → (x0_uncond, x0_cond) at this σ


# --------------------------------------------------------------------------------------------------
# The projection algebra: every reduction is per video, over all axes but the first; scalars keep
# their axes (`[B, 1, ...]`) so that they broadcast against the video.


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Returns `[B, 1, ...]`: Σ a·b over each video of `a, b [B, ...]`."""
    return jnp.sum(a * b, axis=tuple(range(1, a.ndim)), keepdims=True)


def norm(a: jax.Array, eps: float = EPS) -> jax.Array:
    """Returns `[B, 1, ...]`: √(Σa² + ε) per video."""
    return jnp.sqrt(dot(a, a) + eps)


def normalize(v: jax.Array, eps: float = EPS) -> jax.Array:
    """Returns `v / (‖v‖ + ε)` per video: a unit vector, or 0 for v = 0."""
    return v / (norm(v, eps) + eps)


def cosine(a: jax.Array, b: jax.Array, eps: float = EPS) -> jax.Array:
    """Returns `[B, 1, ...]`: a·b / (‖a‖‖b‖ + ε) per video."""
    return dot(a, b) / (norm(a, eps) * norm(b, eps) + eps)


def motion_axis(x0: jax.Array, eps: float = EPS) -> jax.Array:
    """Returns the unit motion axis `[B, F, ...]` of estimates `x0 [B, F, ...]`: the mean frame residual
    x0[t+1] − x0[t] (which telescopes to (x0[F−1] − x0[0])/(F − 1)) in every frame, normalized over the video."""
    residual = jnp.mean(x0[:, 1:] - x0[:, :-1], axis=1, keepdims=True)
    return normalize(jnp.broadcast_to(residual, x0.shape), eps)


def consensus_axis(m_start: jax.Array, m_end: jax.Array, kappa: float, eps: float = EPS) -> jax.Array:
    """Returns the axis `[B, F, ...]` both paths' motion agrees on: normalize((1 − κ)·m_start + κ·m_end) where the
    two unit axes `[B, F, ...]` point the same way (cosine ≥ 0), else the forward path's m_start."""
    blended = normalize((1 - kappa) * m_start + kappa * m_end, eps)
    return jnp.where(cosine(m_start, m_end, eps) >= 0, blended, m_start)


def project(d: jax.Array, m: jax.Array) -> jax.Array:
    """Returns `(d·m)·m` per video: d's component along the unit axis `m [B, F, ...]`, a rank-one projection of the
    whole video (every frame shares one coefficient)."""
    return dot(d, m) * m


def noise_weight(sigma: jax.Array, sigma_max: jax.Array, power: float) -> jax.Array:
    """Returns ρ = 1 − clip(σ/σ_0, 0, 1)^p: 0 at the first step, growing as the noise falls."""
    return 1 - jnp.clip(sigma / sigma_max, 0, 1) ** power


def conflict_aware_update(d: jax.Array, m: jax.Array, rho: jax.Array, eps: float = EPS) -> jax.Array:
    """Returns the update `(1 − β)·d + β·P d` `[B, F, ...]`, P d = `project(d, m)`, β = ρ·max(cos(d, P d), 0).

    cos(d, P d) is |d·m|/‖d‖ for a unit m: the share of d along the axis, never negative (the clamp never acts).
    """
    aligned = project(d, m)
    beta = rho * jnp.maximum(cosine(d, aligned, eps), 0)
    return (1 - beta) * d + beta * aligned


# --------------------------------------------------------------------------------------------------
# The step and the sampler.


def mr_catr_step(denoise_start: Denoiser, denoise_end: Denoiser, x: jax.Array, sigma: jax.Array,
                 sigma_next: jax.Array, fresh: jax.Array, z_start: jax.Array, z_end: jax.Array, *,
                 conflict_aware: jax.Array, rho: jax.Array, kappa: float) -> jax.Array:
    """Returns the latents `[B, F, h, w, C]` at σ' after one MR-CATR step from `x` at σ.

    ViBiD's S(x): a forward CFG++ step on the start keyframe's estimate (last frame := z_end), re-noised to σ
    with `fresh`, then a backward one on the time-reversed latent. Where `conflict_aware` (a bool scalar), the
    backward update d is replaced by `conflict_aware_update(d, m, ρ)` on the consensus motion axis m of the two
    paths' unpinned estimates; elsewhere (and at ρ = 0 up to one rounding) this is ViBiD's step.
    """
    uncond, x0 = denoise_start(x)
    x = cfg_pp_step(pin_last_frame(x0, z_end), x, uncond, sigma, sigma_next)
    x_b = flip_time(x + jnp.sqrt(sigma**2 - sigma_next**2) * fresh)
    uncond_b, x0_b = denoise_end(x_b)
    stepped = cfg_pp_step(pin_last_frame(x0_b, z_start), x_b, uncond_b, sigma, sigma_next)
    axis = consensus_axis(motion_axis(flip_time(x0)), motion_axis(x0_b), kappa)
    blended = x_b + conflict_aware_update(stepped - x_b, axis, rho)
    return flip_time(jnp.where(conflict_aware, blended, stepped))


@dataclasses.dataclass(frozen=True)
class MRCATRConfig(SamplerConfig):
    """Static settings of `sample_mr_catr` (the official script's defaults).

    conflict_fraction γ: steps i < γ·num_steps take the conflict-aware backward update. kappa κ: weight of the
    backward path's axis in the consensus. rho_power p: ρ = 1 − (σ_i/σ_0)^p.
    """

    conflict_fraction: float = 0.2
    kappa: float = 0.2
    rho_power: float = 2.0

    MIN_FRAMES = 3

    def __post_init__(self):
        super().__post_init__()
        checks.number(self.conflict_fraction, "conflict_fraction", "the fraction of conflict-aware steps",
                      minimum=0, maximum=1, example=0.2)
        checks.number(self.kappa, "kappa", "the backward axis' weight", minimum=0, maximum=1, example=0.2)
        checks.number(self.rho_power, "rho_power", "the exponent of the noise weight", minimum=0, example=2.0)

    def program(self) -> StepProgram:
        """One move per step, conflict-aware for i < γ·num_steps (the official test, in float64)."""
        moves = [Move(CONFLICT_AWARE if i < self.conflict_fraction * self.num_steps else PLAIN, i)
                 for i in range(self.num_steps)]
        return StepProgram.build(moves, self.sigmas())


@functools.partial(jax.jit, static_argnames=("cfg",))
def sample_mr_catr(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array,
                   cfg: MRCATRConfig, draws: Draws | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` of videos from each start keyframe to its end keyframe (`Sampled`)."""
    sigma_max = np.float32(cfg.sigmas()[0])

    def move(x, row, fresh):
        return mr_catr_step(lambda y: denoise_pair(unet, y, row.sigma, start),
                            lambda y: denoise_pair(unet, y, row.sigma, end), x, row.sigma, row.sigma_next, fresh,
                            start.clean_latent, end.clean_latent, conflict_aware=row.kind == CONFLICT_AWARE,
                            rho=noise_weight(row.sigma, sigma_max, cfg.rho_power), kappa=cfg.kappa)

    return run_program(move, start_latents(keys, start, cfg, draws), cfg.program(), keys,
                       None if draws is None else draws.moves, progress=cfg.progress, move_uses_noise=True)
