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

import jax
import jax.numpy as jnp

from jinbetween import checks
from jinbetween.conditioning import Conditioning
from jinbetween.denoiser import flip_time
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers import vibid
from jinbetween.samplers.bidirectional import Estimates, Keyframes, PairedMove, pin_last_frame, sample_bidirectional
from jinbetween.samplers.core import (Draws, Move, Progress, Sampled, SamplerConfig, StepProgram, cfg_pp_step,
                                      refuse_delta)

PLAIN, CONFLICT_AWARE = 0, 1  # move kinds: ViBiD's S(x); S(x) with the conflict-aware backward update
UNET_CALLS = {PLAIN: 2, CONFLICT_AWARE: 2}
EPS = 1e-8


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


def conflict_aware_backward_half(x: jax.Array, y: jax.Array, forward: Estimates, backward: Estimates,
                                 move: StepProgram, keyframes: Keyframes, *, sigma_max: float, rho_power: float,
                                 kappa: float) -> jax.Array:
    """Returns the second half of MR-CATR's step in forward order: ViBiD's backward CFG++ step from the end
    keyframe (`vibid.backward_half`), with its update d replaced by `conflict_aware_update(d, m, ρ)` on the
    consensus motion axis m of the two paths' unpinned estimates (the forward one in backward frame order)."""
    x_b = flip_time(y)
    stepped = cfg_pp_step(pin_last_frame(backward.cond, keyframes.start), x_b, backward.uncond, move.sigma,
                          move.sigma_next)
    axis = consensus_axis(motion_axis(flip_time(forward.cond)), motion_axis(backward.cond), kappa)
    rho = noise_weight(move.sigma, jnp.float32(sigma_max), rho_power)
    return flip_time(x_b + conflict_aware_update(stepped - x_b, axis, rho))


def moves(cfg: "MRCATRConfig") -> tuple[PairedMove, PairedMove]:
    """Returns the move of each kind: PLAIN is ViBiD's S(x); CONFLICT_AWARE is S(x) whose backward half blends
    its update with the projection on the consensus motion axis."""
    backward_half = functools.partial(conflict_aware_backward_half, sigma_max=float(cfg.sigmas()[0]),
                                      rho_power=cfg.rho_power, kappa=cfg.kappa)
    return vibid.STEP, PairedMove(vibid.forward_half, backward_half, backward=True)


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


@functools.partial(jax.jit, static_argnames=("cfg", "progress"))
def sample_mr_catr(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array,
                   cfg: MRCATRConfig, *, delta: None = None, draws: Draws | None = None,
                   progress: Progress | None = None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` of videos from each start keyframe to its end keyframe (`Sampled`).

    delta: MR-CATR has no backward model (None). draws: inject every random draw. progress: called with each move's
    index on the host.
    """
    refuse_delta(delta, "MR-CATR")
    return sample_bidirectional(unet, start, end, keys, cfg, moves(cfg), draws, progress)
