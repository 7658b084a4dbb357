"""The dispatch shared by ViBiD and MPD (both written on Stability's sgm sampler): CFG++ moves with keyframe pins.

Every move evaluates the UNet on the `[uncond; cond]` batch and keeps both x0 estimates: the conditional one
(guidance scale 1) is the new estimate and the unconditional one gives the noise direction (CFG++:
`x' = x̂0 + σ'·(x − x̂0_∅)/σ`). Keyframes enter as hard pins: the clean keyframe latent replaces an estimate's end
frame (the official "DDS" conjugate-gradient solve on a 0/1 frame mask, which is exactly that replacement).

A method's moves (ViBiD's step S(x) in `vibid.py`; MPD's distillation and parallel moves in `mpd.py`) are each
written in two parts around the end-conditioned evaluation, a `PairedMove`. Each move evaluates the
start-conditioned UNet once on x, then, when its kind needs it, the end-conditioned one under `lax.cond`: a
program of any mix of kinds compiles two UNet evaluations.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jinbetween.conditioning import Conditioning
from jinbetween.denoiser import denoise_pair, flip_time
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.core import Draws, Progress, Sampled, SamplerConfig, StepProgram, sample_program


class Keyframes(NamedTuple):
    """The clean keyframe latents `[B, h, w, C]` that pin the estimates' end frames."""

    start: jax.Array
    end: jax.Array


class Estimates(NamedTuple):
    """One UNet evaluation's x0 estimates `[B, F, h, w, C]`: unconditional and conditional."""

    uncond: jax.Array
    cond: jax.Array


class PairedMove(NamedTuple):
    """One kind of move, split around the end-conditioned evaluation.

    before(x, forward, row, fresh, keyframes) → y: the latent whose time flip the end-conditioned UNet denoises.
    after(x, y, forward, backward, row, keyframes) → x at σ_next. backward: whether the move needs that
    evaluation (if not, `after` gets zeros).
    """

    before: Callable[..., jax.Array]
    after: Callable[..., jax.Array]
    backward: bool


def pin_last_frame(x0: jax.Array, keyframe: jax.Array) -> jax.Array:
    """Returns `x0 [B, F, ...]` with its last frame replaced by `keyframe [B, ...]`."""
    return x0.at[:, -1].set(keyframe)


def unchanged(x: jax.Array, *_) -> jax.Array:
    """Returns `x`: the `before` of a move whose backward evaluation (if any) sees x itself."""
    return x


def _dispatch(kind: jax.Array, branches: Sequence[Callable[..., jax.Array]], *args) -> jax.Array:
    return branches[0](*args) if len(branches) == 1 else jax.lax.switch(kind, list(branches), *args)


def sample_bidirectional(unet: ModelState[UNet], start: Conditioning, end: Conditioning, keys: jax.Array,
                         cfg: SamplerConfig, moves: Sequence[PairedMove], draws: Draws | None,
                         progress: Progress | None) -> Sampled:
    """Returns the latents `[B, F, h, w, C]` (`Sampled`) after `cfg.program()`, whose move kind k is `moves[k]`;
    call under jit."""
    keyframes = Keyframes(start.clean_latent, end.clean_latent)
    needs_backward = jnp.asarray([m.backward for m in moves])

    def backward_estimates(y: jax.Array, row: StepProgram) -> Estimates:
        return Estimates(*denoise_pair(unet, flip_time(y), row.sigma, end))

    def move(x, row, fresh):
        forward = Estimates(*denoise_pair(unet, x, row.sigma, start))
        y = _dispatch(row.kind, [m.before for m in moves], x, forward, row, fresh, keyframes)
        if all(m.backward for m in moves):
            backward = backward_estimates(y, row)
        else:
            backward = jax.lax.cond(needs_backward[row.kind], lambda: backward_estimates(y, row),
                                    lambda: Estimates(jnp.zeros_like(y), jnp.zeros_like(y)))
        return _dispatch(row.kind, [m.after for m in moves], x, y, forward, backward, row, keyframes)

    return sample_program(move, keys, start, cfg, draws, progress, move_uses_noise=True)
