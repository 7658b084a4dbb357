"""Shared sampler pieces: guidance scales, the CFG++ update, configs, and step programs (the UNet evaluations are
`jinbetween.denoiser`).

A *step program* is a table of moves built on the host from a method's schedule (one row per move:
its kind, σ → σ_next, the σ that scales the UNet input, and how much fresh noise it adds before and
after). `run_program` executes any program with one `lax.scan`, so jump schedules, repeats and
phases are data: a method compiles once whatever its schedule.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween import checks, schedule
from jinbetween.conditioning import Conditioning
from jinbetween.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# Guidance.


def per_frame_guidance(min_scale: float, max_scale: float, num_frames: int) -> np.ndarray:
    """Returns `[F]` float32 guidance scales linspace(min, max, F): weak at the keyframe, strong at the end."""
    return np.linspace(min_scale, max_scale, num_frames, dtype=np.float32)


def cfg_pp_step(x0: jax.Array, x: jax.Array, x0_uncond: jax.Array, sigma: jax.Array,
                sigma_next: jax.Array) -> jax.Array:
    """Returns the CFG++ update `x0 + σ_next·(x − x0_uncond)/σ`: the estimate moved along the unconditional noise."""
    return x0 + (x - x0_uncond) * (sigma_next / sigma)


# --------------------------------------------------------------------------------------------------
# Settings every sampler shares.


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Frames, steps and the noise range of a sampler.

    Every field is checked when the config is made (ArgumentError names the field and the fix); a subclass checks
    its own fields in its `__post_init__` after calling this one's.
    """

    MIN_FRAMES: ClassVar[int] = 2  # a video; the inbetweening samplers need a frame between the two keyframes

    num_frames: int = 25
    num_steps: int = 25
    sigma_min: float = schedule.SIGMA_MIN
    sigma_max: float = schedule.SIGMA_MAX

    def __post_init__(self):
        checks.integer(self.num_frames, "num_frames", "the frame count", minimum=self.MIN_FRAMES,
                       example=max(self.MIN_FRAMES, 14))
        checks.integer(self.num_steps, "num_steps", "the denoising steps", minimum=1, example=25)
        checks.number(self.sigma_min, "sigma_min", "the smallest noise level", above=0, example=schedule.SIGMA_MIN)
        checks.number(self.sigma_max, "sigma_max", "the largest noise level", above=self.sigma_min,
                      example=max(schedule.SIGMA_MAX, 2 * self.sigma_min))

    def sigmas(self) -> np.ndarray:
        """The Karras schedule `[num_steps + 1]` (a final 0 appended)."""
        return schedule.karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max)


@dataclasses.dataclass(frozen=True)
class GuidedSamplerConfig(SamplerConfig):
    """A sampler with classifier-free guidance between `min_guidance_scale` and `max_guidance_scale`."""

    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0

    def __post_init__(self):
        super().__post_init__()
        checks.number(self.min_guidance_scale, "min_guidance_scale", "a guidance scale", example=1.0)
        checks.number(self.max_guidance_scale, "max_guidance_scale", "a guidance scale", example=3.0)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on iff max_guidance_scale > 1 (as in diffusers)."""
        return self.max_guidance_scale > 1


# --------------------------------------------------------------------------------------------------
# Step programs.


class Move(NamedTuple):
    """One row of a step program, as the host builds it (σ given by schedule index)."""

    kind: int
    step: int  # σ_step → σ_step+1
    noise_before: float = 0.0  # std of fresh noise added before the move
    noise_after: float = 0.0  # std of fresh noise added after the move
    input_step: int | None = None  # σ index that scales the UNet input (default: step)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepProgram:
    """A sampler's schedule as arrays `[S]`, one entry per move, executed in order by `run_program`."""

    kind: jax.Array  # int32, the method's move kind
    step: jax.Array  # int32, the schedule index of σ
    sigma: jax.Array  # float32 σ
    sigma_next: jax.Array  # float32 σ after the move
    sigma_in: jax.Array  # float32 σ of the UNet input scale c_in (≠ σ only to reproduce a reference quirk)
    noise_before: jax.Array  # float32 std of the noise added before the move
    noise_after: jax.Array  # float32 std of the noise added after it

    @classmethod
    def build(cls, moves: Sequence[Move], sigmas: np.ndarray) -> "StepProgram":
        """Returns the program of `moves` over the schedule `sigmas [N+1]` (numpy arrays, host side)."""
        if not moves:
            raise ValueError("A step program needs at least one move.")
        steps = np.array([m.step for m in moves], np.int32)
        inputs = np.array([m.step if m.input_step is None else m.input_step for m in moves], np.int32)
        sigmas = np.asarray(sigmas, np.float32)
        return cls(kind=np.array([m.kind for m in moves], np.int32), step=steps, sigma=sigmas[steps],
                   sigma_next=sigmas[steps + 1], sigma_in=sigmas[inputs],
                   noise_before=np.array([m.noise_before for m in moves], np.float32),
                   noise_after=np.array([m.noise_after for m in moves], np.float32))

    def __len__(self) -> int:
        return int(np.shape(self.kind)[0])

    def count(self, kind: int) -> int:
        """Returns how many moves of `kind` the program has."""
        return int(np.sum(np.asarray(self.kind) == kind))


def renoise_std(sigmas: np.ndarray, low: int, high: int) -> float:
    """Returns √(σ_high_index² − σ_low_index²) for `high < low`: the noise that takes σ[low] back up to σ[high]."""
    s = np.asarray(sigmas, np.float64)
    return float(np.sqrt(s[high] ** 2 - s[low] ** 2))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Draws:
    """Every standard-normal draw of a run: `initial [B, F, h, w, C]` and `moves [S, B, F, h, w, C]` (one per move)."""

    initial: jax.Array
    moves: jax.Array


def _initial_key(key: jax.Array) -> jax.Array:
    return jax.random.fold_in(key, 0)


def _move_key(key: jax.Array, index: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, 1), index)


def initial_draw(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Returns `[B, *shape]` standard normal, one draw per key of `keys [B]` (independent of batch size)."""
    return jax.vmap(lambda k: jax.random.normal(_initial_key(k), shape))(keys)


def move_draw(keys: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Returns `[B, *shape]` standard normal: the fresh noise of move `index` for each key."""
    return jax.vmap(lambda k: jax.random.normal(_move_key(k, index), shape))(keys)


def draws_from_keys(keys: jax.Array, num_moves: int, shape: tuple[int, ...]) -> Draws:
    """Returns the draws a sampler makes from `keys [B]` when none are injected (for tests and harnesses)."""
    return Draws(initial_draw(keys, shape),
                 jnp.stack([move_draw(keys, jnp.int32(i), shape) for i in range(num_moves)]))


def start_latents(keys: jax.Array, cond: Conditioning, cfg: SamplerConfig, draws: Draws | None) -> jax.Array:
    """Returns the initial latents `[B, F, h, w, C]`: a standard-normal draw (the keys' or `draws.initial`)
    scaled by √(σmax² + 1)."""
    initial = initial_draw(keys, (cfg.num_frames, *cond.image_latent.shape[1:])) if draws is None else draws.initial
    return initial * jnp.float32(schedule.init_noise_sigma(cfg.sigma_max))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampled:
    """A sampler's result: `latents [B, F, h, w, C]` and, per video, `diverged_at [B]` (int32): how many moves had run
    when its latents first held NaN or Inf (0: before the first move), or -1 if they stayed finite."""

    latents: jax.Array
    diverged_at: jax.Array


def _finite_rows(x: jax.Array) -> jax.Array:
    """Returns `[B]` bool: whether each video of `x [B, ...]` is finite everywhere."""
    return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


Progress = Callable[[int], None]
MoveFn = Callable[[jax.Array, StepProgram, jax.Array | None], jax.Array]


def run_program(move: MoveFn, x: jax.Array, program: StepProgram, keys: jax.Array,
                move_draws: jax.Array | None = None, progress: Progress | None = None,
                move_uses_noise: bool = False) -> Sampled:
    """Returns `x` after every move of `program` (host arrays), in one `lax.scan`, with the move after which each
    video first held NaN or Inf (a reduction per move, carried through the scan).

    Each move i adds `noise_before·n_i`, applies `move(x, row, n_i)`, then adds `noise_after·n_i`, where
    `n_i` is standard normal from `keys [B]` (or `move_draws[i]` when given). A program never uses both
    noise fields and a move's own use of `n_i` (`move_uses_noise`) in one row, so one draw per move
    suffices. Programs without noise draw nothing (`n_i` is None). `progress(i)` is called on the host after move
    i (a `jax.debug.callback`; none is compiled in without it).
    """
    noisy = move_uses_noise or bool(np.any(program.noise_before)) or bool(np.any(program.noise_after))

    def body(carry, inputs):
        x, diverged_at = carry
        index, row, injected = inputs
        fresh = None
        if noisy:
            fresh = move_draw(keys, index, x.shape[1:]) if injected is None else injected
            x = x + row.noise_before * fresh
        x = move(x, row, fresh)
        if noisy:
            x = x + row.noise_after * fresh
        if progress is not None:
            jax.debug.callback(lambda i: progress(int(i)), index, ordered=True)
        diverged_at = jnp.where((diverged_at < 0) & ~_finite_rows(x), index + 1, diverged_at)
        return (x, diverged_at), None

    rows = jax.tree.map(jnp.asarray, program)
    start = jnp.where(_finite_rows(x), -1, 0).astype(jnp.int32)
    (x, diverged_at), _ = jax.lax.scan(body, (x, start), (jnp.arange(len(program)), rows, move_draws))
    return Sampled(x, diverged_at)


def sample_program(move: MoveFn, keys: jax.Array, cond: Conditioning, cfg: SamplerConfig, draws: Draws | None,
                   progress: Progress | None, *, move_uses_noise: bool = False) -> Sampled:
    """Returns the sampler's result (`Sampled`): `cfg.program()` run by `run_program` with `move`, from the initial
    latents of `keys` (or `draws.initial`), every random draw from `keys` unless `draws` injects them."""
    return run_program(move, start_latents(keys, cond, cfg, draws), cfg.program(), keys,
                       None if draws is None else draws.moves, progress, move_uses_noise)


def refuse_delta(delta: object, method: str) -> None:
    """Raises ConfigError if a backward delta is passed to `method`, which has no backward model to add it to."""
    if delta is not None:
        raise ConfigError(f"{method} has no backward model to add a delta to; pass delta=None (only GI uses one).")
