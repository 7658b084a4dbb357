"""Shared sampler pieces: UNet evaluations, guidance, time flips, fusion, and step programs.

A *step program* is a table of moves built on the host from a method's schedule (one row per move:
its kind, σ → σ_next, the σ that scales the UNet input, and how much fresh noise it adds before and
after). `run_program` executes any program with one `lax.scan`, so jump schedules, repeats and
phases are data: a method compiles once whatever its schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween import checks, schedule
from jinbetween.conditioning import Conditioning, cfg_batch
from jinbetween.models.attention import AttnControl
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet

_progress_hook: Callable[[int], None] | None = None
_unet_call_hook: Callable[[], None] | None = None


# --------------------------------------------------------------------------------------------------
# Guidance, flips, fusion.


def per_frame_guidance(min_scale: float, max_scale: float, num_frames: int) -> np.ndarray:
    """Returns `[F]` float32 guidance scales linspace(min, max, F): weak at the keyframe, strong at the end."""
    return np.linspace(min_scale, max_scale, num_frames, dtype=np.float32)


def flip_time(x: jax.Array) -> jax.Array:
    """Returns `x [B, F, ...]` with its frames in reverse order."""
    return jnp.flip(x, axis=1)


def _per_frame(weights: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.reshape(weights, (1, -1) + (1,) * (like.ndim - 2))


def fuse(forward: jax.Array, backward: jax.Array, forward_weights: jax.Array,
         backward_weights: jax.Array) -> jax.Array:
    """Returns `w_f ⊙ forward + w_b ⊙ flip(backward)`: a forward-order path fused with a backward-order one.

    forward, backward: `[B, F, ...]`, each in its own frame order. Weights `[F]` in output (forward) order.
    """
    return (_per_frame(forward_weights, forward) * forward
            + _per_frame(backward_weights, backward) * flip_time(backward))


def cfg_pp_step(x0: jax.Array, x: jax.Array, x0_uncond: jax.Array, sigma: jax.Array,
                sigma_next: jax.Array) -> jax.Array:
    """Returns the CFG++ update `x0 + σ_next·(x − x0_uncond)/σ`: the estimate moved along the unconditional noise."""
    return x0 + (x - x0_uncond) * (sigma_next / sigma)


# --------------------------------------------------------------------------------------------------
# UNet evaluations.


def unet_velocity(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array, cond: Conditioning, *, guided: bool,
                  attn: AttnControl | None = None, sigma_in: jax.Array | None = None, remat: bool = False):
    """Returns the UNet's v for latents `x [B, F, h, w, C]` at σ: `[uncond; cond]` (2B rows) if guided, else B rows.

    σ is a scalar or one per clip `[B]`. `sigma_in` (default σ) sets the input scale 1/√(σ_in² + 1). With
    `attn` capturing, also returns the maps. `remat` rematerializes per UNet block when differentiated.
    """
    embeds, image_latents, time_ids = cfg_batch(cond, guided=guided)
    per_clip = lambda s: jnp.broadcast_to(s, x.shape[:1])  # noqa: E731
    scaled = x * schedule.c_in(per_clip(sigma if sigma_in is None else sigma_in)).reshape(-1, 1, 1, 1, 1)
    c_noise = schedule.c_noise(per_clip(sigma))
    if guided:
        scaled, c_noise = jnp.concatenate([scaled, scaled]), jnp.concatenate([c_noise, c_noise])
    frames = jnp.broadcast_to(image_latents[:, None], (*scaled.shape[:2], *image_latents.shape[1:]))
    unet_input = jnp.concatenate([scaled, frames], axis=-1)
    if _unet_call_hook is not None:
        jax.debug.callback(_unet_call_hook, ordered=True)
    return unet.merge()(unet_input, c_noise, embeds, time_ids, attn=attn, remat=remat)


def guided_velocity(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array, cond: Conditioning,
                    guidance: jax.Array | None, attn: AttnControl | None = None,
                    sigma_in: jax.Array | None = None):
    """Returns the (classifier-free guided) v-prediction `[B, F, h, w, C]` for latents `x [B, F, h, w, C]` at σ.

    `guidance [F]` per frame, or None for a single conditional pass. With `attn` capturing, also
    returns the captured maps (of the `[uncond, cond]` batch).
    """
    out = unet_velocity(unet, x, sigma, cond, guided=guidance is not None, attn=attn, sigma_in=sigma_in)
    v, maps = out if isinstance(out, tuple) else (out, None)
    if guidance is not None:
        uncond, cond_v = jnp.split(v, 2)
        v = uncond + _per_frame(guidance, uncond) * (cond_v - uncond)
    return v if maps is None else (v, maps)


def denoise(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array, cond: Conditioning,
            guidance: jax.Array | None) -> jax.Array:
    """Returns the x0 estimate `[B, F, h, w, C]` of latents `x` at noise level σ."""
    return schedule.denoised(x, guided_velocity(unet, x, sigma, cond, guidance), sigma)


def denoise_pair(unet: ModelState[UNet], x: jax.Array, sigma: jax.Array,
                 cond: Conditioning) -> tuple[jax.Array, jax.Array]:
    """Returns `(x0_uncond, x0_cond)`, each `[B, F, h, w, C]`, from one UNet call on the `[uncond; cond]` batch."""
    uncond, cond_v = jnp.split(unet_velocity(unet, x, sigma, cond, guided=True), 2)
    return schedule.denoised(x, uncond, sigma), schedule.denoised(x, cond_v, sigma)


# --------------------------------------------------------------------------------------------------
# Settings every sampler shares.


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Frames, steps and the noise range of a sampler; `progress` reports each move to the host.

    Every field is checked when the config is made (ArgumentError names the field and the fix); a subclass checks
    its own fields in its `__post_init__` after calling this one's.
    """

    MIN_FRAMES: ClassVar[int] = 2  # a video; the inbetweening samplers need a frame between the two keyframes

    num_frames: int = 25
    num_steps: int = 25
    sigma_min: float = schedule.SIGMA_MIN
    sigma_max: float = schedule.SIGMA_MAX
    progress: bool = False

    def __post_init__(self):
        checks.integer(self.num_frames, "num_frames", "the frame count", minimum=self.MIN_FRAMES,
                       example=max(self.MIN_FRAMES, 14))
        checks.integer(self.num_steps, "num_steps", "the denoising steps", minimum=1, example=25)
        checks.number(self.sigma_min, "sigma_min", "the smallest noise level", above=0, example=schedule.SIGMA_MIN)
        checks.number(self.sigma_max, "sigma_max", "the largest noise level", above=self.sigma_min,
                      example=max(schedule.SIGMA_MAX, 2 * self.sigma_min))
        checks.boolean(self.progress, "progress", "progress")

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


def run_program(move: Callable[[jax.Array, StepProgram, jax.Array | None], jax.Array], x: jax.Array,
                program: StepProgram, keys: jax.Array, move_draws: jax.Array | None = None,
                progress: bool = False, move_uses_noise: bool = False) -> Sampled:
    """Returns `x` after every move of `program` (host arrays), in one `lax.scan`, with the move after which each
    video first held NaN or Inf (a reduction per move, carried through the scan).

    Each move i adds `noise_before·n_i`, applies `move(x, row, n_i)`, then adds `noise_after·n_i`, where
    `n_i` is standard normal from `keys [B]` (or `move_draws[i]` when given). A program never uses both
    noise fields and a move's own use of `n_i` (`move_uses_noise`) in one row, so one draw per move
    suffices. Programs without noise draw nothing (`n_i` is None).
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
        if progress:
            report_step(index)
        diverged_at = jnp.where((diverged_at < 0) & ~_finite_rows(x), index + 1, diverged_at)
        return (x, diverged_at), None

    rows = jax.tree.map(jnp.asarray, program)
    start = jnp.where(_finite_rows(x), -1, 0).astype(jnp.int32)
    (x, diverged_at), _ = jax.lax.scan(body, (x, start), (jnp.arange(len(program)), rows, move_draws))
    return Sampled(x, diverged_at)


# --------------------------------------------------------------------------------------------------
# Host-side reporting (progress bars, UNet call counts).


def report_step(step: jax.Array) -> None:
    """Tells the active `sampling_progress` display that `step` finished (a no-op without one)."""
    jax.debug.callback(lambda i: _progress_hook and _progress_hook(int(i)), step, ordered=True)


@contextlib.contextmanager
def sampling_progress(callback: Callable[[int], None]):
    """Calls `callback(step)` after every sampling step of samplers traced with `progress=True` in this block."""
    global _progress_hook
    previous, _progress_hook = _progress_hook, callback
    try:
        yield
    finally:
        _progress_hook = previous


@contextlib.contextmanager
def count_unet_calls():
    """Yields a list that holds one entry per UNet evaluation executed in this block (tests, debugging).

    Clears JAX's compilation caches on entry and exit, so that samplers are traced with the counter
    inside and production programs never keep it.
    """
    global _unet_call_hook
    calls: list[None] = []
    jax.clear_caches()
    _unet_call_hook = lambda: calls.append(None)
    try:
        yield calls
    finally:
        _unet_call_hook = None
        jax.clear_caches()
