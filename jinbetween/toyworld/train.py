"""Train the toy world's models: the VAE on frames, the image-to-video UNet with its image encoder, GI's delta.

Stage 1 (`train_vae`): the SVD VAE (per-frame encoder, temporal decoder) on 14-frame clips, L1 reconstruction plus
a small KL term; `scaling_factor` is then set to 1 / the standard deviation of the training latents.

Stage 2 (`unet_loss`, `make_unet_step`): SVD's objective with the VAE frozen. EDM v-prediction with
ln σ ~ N(0.7, 1.6²) and the weight (1 + σ²)/σ² on x0 (σ_data = 1), the first frame as conditioning (its
noise-augmented latent concatenated to every frame, augmentation strength ~ lognormal(−3, 0.5) fed as the third
time id, its clean image through the image encoder, trained jointly), and both conditionings zeroed together for
`cond_dropout` of the clips, which is what classifier-free guidance asks of the model at sampling time. The videos
are rendered and encoded once into a `ClipPool` on the device (clip latents and K noise-augmented first-frame
latents per video); a step draws its batch from it. Parameters, AdamW state and an EMA of the parameters stay in
float32 (`TrainState`); the forward pass runs in bf16. The learning rate and the EMA decay are arguments of the
compiled step, computed on the host, so a run's schedule can be extended without recompiling or resetting state.

Stage 3 (`train_backward_delta`): GI's backward delta (`jinbetween.finetune.train_step`, GI's Algorithm 1) on the
EMA UNet in bf16, as it ships, with clips from the same pool.

A run lives in one folder (`RUN`: its settings, the encoded pool, orbax checkpoints of the full TrainState, the
log), so a time-boxed machine can train it over several calls, each continuing exactly where the last stopped:

    python -m jinbetween.toyworld.train unet --run RUN --init jinbetween/toyworld/weights --videos 48000 \\
        --batch-sizes 64 128 256 512 --train-minutes 15 --deadline-minutes 9      # creates, measures, trains
    python -m jinbetween.toyworld.train unet --run RUN --deadline-minutes 9       # continues
    python -m jinbetween.toyworld.train release --run RUN --out RELEASE           # GI delta, bf16 pipeline, manifest
    python -m jinbetween.toyworld.train evaluate jinbetween/toyworld/weights RELEASE       # held-out x0 error
    python -m jinbetween.toyworld.train vae --out runs/vae --videos 20000 --vae-steps 4000   # stage 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jinbetween import conditioning, denoiser, logs
from jinbetween.conditioning import Conditioning
from jinbetween.config import VAEConfig
from jinbetween.models import VAE, ImageEncoder, UNet
from jinbetween.models.state import ModelState, abstract
from jinbetween.toyworld import models, world
from jinbetween.weights import load_image_encoder, load_unet, load_vae

if TYPE_CHECKING:
    from jinbetween import finetune

log = logging.getLogger(__name__)

FPS = 7.0  # the world's frame rate: time id fps − 1 = 6
MOTION_BUCKET_ID = 127.0  # fixed: the toy world has no motion-strength labels
# "constant" (after warm-up) suits a run that a time limit may cut and a later run continues with "cosine".
SCHEDULES = ("cosine", "constant")
# The cosine schedule ends at this fraction of the peak learning rate.
FINAL_LR_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """Stage 1: steps of `batch_clips` clips (all their frames) with AdamW, linear warm-up then cosine decay."""

    steps: int = 4000
    batch_clips: int = 4
    learning_rate: float = 3e-4
    warmup: int = 200
    kl_weight: float = 1e-5
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_clips < 1:
            raise ValueError(f"VAETrainConfig needs steps >= 1 and batch_clips >= 1, got {self.steps}, "
                             f"{self.batch_clips}.")


@dataclasses.dataclass(frozen=True)
class UNetTrainConfig:
    """Stage 2: SVD's objective (see the module docstring); AdamW with warm-up then `schedule` over `steps`, an EMA
    of the parameters with `ema_decay`, `cond_draws` noise-augmented first-frame latents encoded per pool video."""

    steps: int = 8000
    batch_size: int = 32
    learning_rate: float = 2e-4
    warmup: int = 300
    weight_decay: float = 1e-2
    clip_norm: float = 1.0
    p_mean: float = 0.7
    p_std: float = 1.6
    aug_log_mean: float = -3.0
    aug_log_std: float = 0.5
    cond_dropout: float = 0.15
    schedule: str = "cosine"
    ema_decay: float = 0.999
    cond_draws: int = 4

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; choose one of {SCHEDULES}.")
        if self.steps < 1 or self.batch_size < 1 or self.cond_draws < 1:
            raise ValueError(f"UNetTrainConfig needs steps, batch_size and cond_draws >= 1, got {self.steps}, "
                             f"{self.batch_size}, {self.cond_draws}.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay}: use a value in [0, 1).")


def _render_seed(seed: int) -> np.ndarray:
    return world.video(seed)


def render_pool(seeds: list[int], workers: int | None = None) -> np.ndarray:
    """Returns the videos of `seeds` as uint8 `[N, F, H, W, 3]` (default WorldConfig), rendered in `workers`
    processes (all cores by default)."""
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return np.stack(pool.map(_render_seed, seeds, chunksize=64))


def learning_rate_at(step: int, steps: int, warmup: int, peak: float, kind: str = "cosine") -> float:
    """Returns the learning rate of `step` (0-based): linear warm-up from 0 over `warmup` steps, then constant or
    a cosine decay to FINAL_LR_FRACTION · peak at `steps` (held there after)."""
    warmup = min(warmup, steps - 1)
    if step < warmup:
        return peak * step / warmup
    if kind == "constant":
        return peak
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    final = FINAL_LR_FRACTION * peak
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def _schedule(steps: int, warmup: int, peak: float, kind: str = "cosine") -> optax.Schedule:
    warmup = min(warmup, steps - 1)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, 2), peak * FINAL_LR_FRACTION)


def with_config(module: nnx.Module, config) -> nnx.Module:
    """Returns `module`'s parameters under another config of the same architecture (a VAE's scaling factor, an
    attention kernel)."""
    graphdef = nnx.graphdef(abstract(type(module), config))
    return nnx.merge(graphdef, nnx.state(module))


def _for_training(module: nnx.Module) -> nnx.Module:
    """XLA attention: cuDNN's fused attention has no backward pass for some of these short sequences (65 tokens)."""
    return with_config(module, module.config.replace(attention_impl="xla"))


def _bf16(state: nnx.State) -> nnx.State:
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)


def _float32(state: nnx.State) -> nnx.State:
    return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)


def _pixels(frames: jax.Array) -> jax.Array:
    return frames.astype(jnp.float32) / 127.5 - 1


# --------------------------------------------------------------------------------------------------
# Stage 1: the VAE.


def vae_loss(state: nnx.State, graphdef: nnx.GraphDef, clips: jax.Array, key: jax.Array,
             kl_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (L1 + MSE + kl_weight·KL, metrics) of the VAE on uint8 clips `[B, F, H, W, 3]` (a posterior sample
    decoded as one video per clip)."""
    vae = nnx.merge(graphdef, _bf16(state))
    b, f = clips.shape[:2]
    x = _pixels(clips.reshape(b * f, *clips.shape[2:]))
    mean, logvar = vae.encode_moments(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    reconstruction = vae.decode(z, f)
    l1 = jnp.mean(jnp.abs(reconstruction - x))
    mse = jnp.mean((reconstruction - x) ** 2)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1 - logvar)
    return l1 + mse + kl_weight * kl, {"l1": l1, "mse": mse, "kl": kl, "latent_std": jnp.std(mean)}


def train_vae(pool: jax.Array, cfg: VAETrainConfig, seed: int, on_log: Callable[[dict], None] = lambda r: None,
              log_every: int = 100, time_limit: float | None = None, config: VAEConfig | None = None,
              init: VAE | None = None) -> VAE:
    """Returns the VAE trained on clips of the uint8 video pool `[N, F, H, W, 3]` (on the device), from `init`
    or from scratch with `config` (default: the toy world's), its scaling_factor set from the pool's latents."""
    config = init.config if init is not None else config or models.vae_config()
    vae = (with_config(init, config.replace(lean_decode=False)) if init is not None
           else VAE(config.replace(lean_decode=False), rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(vae)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(_schedule(cfg.steps, cfg.warmup, cfg.learning_rate), weight_decay=0.0))
    opt_state = tx.init(state)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(state, opt_state, step_key, pool):
        batch_key, noise_key = jax.random.split(step_key)
        index = jax.random.randint(batch_key, (cfg.batch_clips,), 0, pool.shape[0])
        (loss, metrics), grads = jax.value_and_grad(vae_loss, has_aux=True)(state, graphdef, pool[index], noise_key,
                                                                            cfg.kl_weight)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, {"loss": loss, **metrics}

    start, sums, count = time.perf_counter(), None, 0
    key = jax.random.key(seed)
    for i in range(cfg.steps):
        state, opt_state, metrics = step(state, opt_state, jax.random.fold_in(key, i), pool)
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count += 1
        elapsed = time.perf_counter() - start
        stopping = time_limit is not None and elapsed > time_limit
        if (i + 1) % log_every == 0 or i + 1 == cfg.steps or stopping:
            on_log({"stage": "vae", "step": i + 1, **{k: float(v) / count for k, v in sums.items()},
                    "seconds": round(elapsed, 2)})
            sums, count = None, 0
        if stopping:
            on_log({"stage": "vae", "stopped_early_at": i + 1, "planned_steps": cfg.steps})
            break
    vae = nnx.merge(graphdef, state)
    scale = 1.0 / float(latent_std(vae, pool, jax.random.key(seed + 1)))
    return with_config(vae, config.replace(scaling_factor=round(scale, 5)))


def latent_std(vae: VAE, pool: jax.Array, key: jax.Array, clips: int = 256) -> jax.Array:
    """Returns the standard deviation of the posterior means of `clips` random pool clips."""
    index = np.asarray(jax.random.randint(key, (clips,), 0, pool.shape[0]))
    state = ModelState.of(vae)
    encode = jax.jit(lambda state, frames: state.merge().encode(_pixels(frames.reshape(-1, *frames.shape[2:]))))
    return jnp.std(jnp.concatenate([encode(state, pool[index[i:i + 16]]) for i in range(0, len(index), 16)]))


# --------------------------------------------------------------------------------------------------
# The encoded training pool.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClipPool:
    """Training videos encoded once and kept on the device: N videos, K conditioning draws each.

    latents: `[N, F, h, w, C]` bf16, scaling_factor × VAE posterior means of every frame.
    first_frames, last_frames: uint8 `[N, H, W, 3]`: the image encoder's input (it trains) and GI's end keyframe.
    cond_latents: `[N, K, h, w, C]` bf16, unscaled posterior means of the first frame plus `cond_aug`·noise.
    cond_aug: `[N, K]` float32, those noise-augmentation strengths (the third time id).
    """

    latents: jax.Array
    first_frames: jax.Array
    last_frames: jax.Array
    cond_latents: jax.Array
    cond_aug: jax.Array

    def __len__(self) -> int:
        return self.latents.shape[0]


_BF16_POOL_FIELDS = ("latents", "cond_latents")


@functools.partial(jax.jit, static_argnames=("draws", "aug_log_mean", "aug_log_std"))
def encode_videos(vae: ModelState[VAE], videos: jax.Array, key: jax.Array, *, draws: int, aug_log_mean: float,
                  aug_log_std: float) -> ClipPool:
    """Returns the ClipPool of uint8 `videos [n, F, H, W, 3]`: latents of every frame, and `draws` encodings of each
    first frame with pixel noise of strength ~ lognormal(aug_log_mean, aug_log_std), as SVD conditions."""
    model = vae.merge()
    n, f = videos.shape[:2]
    z = model.config.scaling_factor * model.encode(_pixels(videos.reshape(n * f, *videos.shape[2:])))
    aug_key, noise_key = jax.random.split(key)
    aug = jnp.exp(aug_log_mean + aug_log_std * jax.random.normal(aug_key, (n, draws)))
    first = _pixels(videos[:, 0])
    noise = jax.random.normal(noise_key, (n, draws, *first.shape[1:]))
    noisy = first[:, None] + aug[..., None, None, None] * noise
    cond = model.encode(noisy.reshape(n * draws, *first.shape[1:]))
    return ClipPool(latents=z.reshape(n, f, *z.shape[1:]).astype(jnp.bfloat16), first_frames=videos[:, 0],
                    last_frames=videos[:, -1],
                    cond_latents=cond.reshape(n, draws, *cond.shape[1:]).astype(jnp.bfloat16), cond_aug=aug)


def build_pool(vae: VAE, seeds: Sequence[int], key: jax.Array, cfg: UNetTrainConfig, *, chunk: int = 256,
               workers: int | None = None, videos: Callable[[int], np.ndarray] = _render_seed,
               on_log: Callable[[dict], None] = lambda r: None, log_every: int = 8) -> ClipPool:
    """Returns the ClipPool of the toy-world videos of `seeds`, rendered by `videos(seed)` in `workers` processes
    (all cores by default; 0: in this process) while the device encodes the chunks already rendered. Chunk i
    (`chunk` videos) draws its augmentation from fold_in(key, i). A last, partial chunk after full ones is padded
    with copies of its last video (then cut), so that every chunk runs one compiled program. Every `log_every`
    chunks, `on_log` gets the videos encoded so far and the seconds since the start (dispatched, not waited for)."""
    vae_state = ModelState.of(vae)
    parts, buffer = [], []
    start = time.monotonic()

    def encode(batch: list[np.ndarray]) -> ClipPool:
        size = len(batch)
        padded = batch + batch[-1:] * (chunk - size) if parts else batch
        encoded = encode_videos(vae_state, jnp.asarray(np.stack(padded)), jax.random.fold_in(key, len(parts)),
                                draws=cfg.cond_draws, aug_log_mean=cfg.aug_log_mean, aug_log_std=cfg.aug_log_std)
        return jax.tree.map(lambda a: a[:size], encoded)

    def consume(rendered) -> None:
        nonlocal buffer
        for video in rendered:
            buffer.append(video)
            if len(buffer) == chunk:
                parts.append(encode(buffer))
                buffer = []
                if len(parts) % log_every == 0:
                    on_log({"stage": "pool", "encoding": len(parts) * chunk, "of": len(seeds),
                            "seconds": round(time.monotonic() - start, 1)})
        if buffer:
            parts.append(encode(buffer))

    if workers == 0:
        consume(map(videos, seeds))
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as processes:
            consume(processes.imap(videos, seeds, chunksize=16))
    return jax.tree.map(lambda *arrays: jnp.concatenate(arrays), *parts)


def save_pool(pool: ClipPool, folder: Path) -> None:
    """Writes each field of `pool` to `folder/NAME.npy` (bf16 fields as their uint16 bits)."""
    folder.mkdir(parents=True, exist_ok=True)
    for field in dataclasses.fields(ClipPool):
        array = np.asarray(getattr(pool, field.name))
        np.save(folder / f"{field.name}.npy", array.view(np.uint16) if field.name in _BF16_POOL_FIELDS else array)


def load_pool(folder: Path) -> ClipPool:
    """Returns the ClipPool that `save_pool` wrote to `folder`, on the default device."""
    arrays = {}
    for field in dataclasses.fields(ClipPool):
        array = np.load(folder / f"{field.name}.npy")
        arrays[field.name] = jnp.asarray(array.view(jnp.bfloat16) if field.name in _BF16_POOL_FIELDS else array)
    return ClipPool(**arrays)


# --------------------------------------------------------------------------------------------------
# Stage 2: the UNet and the image encoder.


def clip_input(frames: jax.Array, size: int) -> jax.Array:
    """Returns the image encoder input `[B, S, S, 3]` of uint8 frames `[B, H, W, 3]`: `conditioning.clip_pixels`
    (anti-aliased bicubic resize, CLIP normalization) as device matmuls."""
    x = _pixels(frames)
    rows, cols = (jnp.asarray(m, jnp.float32) for m in conditioning.clip_resize_matrices(*frames.shape[1:3], size))
    resized = jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols, precision="highest")
    return conditioning.clip_normalize(resized)


class Trainables(nnx.Module):
    """The two models stage 2 trains together."""

    def __init__(self, unet: UNet, image_encoder: ImageEncoder):
        self.unet, self.image_encoder = unet, image_encoder


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UNetBatch:
    """One batch of stage 2.

    latents: `[B, F, h, w, C]` scaled clip latents; first_frames: uint8 `[B, H, W, 3]` (the image encoder's input);
    image_latent: `[B, h, w, C]` unscaled latent of the noise-augmented first frame; aug: `[B]` its strength.
    """

    latents: jax.Array
    first_frames: jax.Array
    image_latent: jax.Array
    aug: jax.Array


def draw_batch(pool: ClipPool, key: jax.Array, batch_size: int) -> UNetBatch:
    """Returns `batch_size` clips drawn uniformly with replacement from `pool`, each with one of its conditioning
    draws."""
    index_key, draw_key = jax.random.split(key)
    index = jax.random.randint(index_key, (batch_size,), 0, len(pool))
    draw = jax.random.randint(draw_key, (batch_size,), 0, pool.cond_aug.shape[1])
    return UNetBatch(latents=pool.latents[index], first_frames=pool.first_frames[index],
                     image_latent=pool.cond_latents[index, draw], aug=pool.cond_aug[index, draw])


def unet_loss(params: nnx.State, graphdef: nnx.GraphDef, batch: UNetBatch, key: jax.Array,
              cfg: UNetTrainConfig) -> tuple[jax.Array, dict]:
    """Returns (the EDM-weighted x0 loss, metrics) of the UNet + image encoder `params` on one batch, the forward
    pass in bf16."""
    model = nnx.merge(graphdef, _bf16(params))
    b = batch.latents.shape[0]
    sigma_key, eps_key, drop_key = jax.random.split(key, 3)
    sigma = jnp.exp(cfg.p_mean + cfg.p_std * jax.random.normal(sigma_key, (b,)))
    embeds = model.image_encoder(clip_input(batch.first_frames, model.image_encoder.config.image_size))[:, None]
    keep = (jax.random.uniform(drop_key, (b,)) >= cfg.cond_dropout).astype(jnp.float32)
    image_latent = batch.image_latent.astype(jnp.float32) * keep[:, None, None, None]
    embeds = embeds * keep[:, None, None].astype(embeds.dtype)
    time_ids = jnp.stack([jnp.full((b,), FPS - 1), jnp.full((b,), MOTION_BUCKET_ID), batch.aug], axis=-1)

    z = batch.latents.astype(jnp.float32)
    s = sigma[:, None, None, None, None]
    z_t = z + s * jax.random.normal(eps_key, z.shape)
    cond = Conditioning(image_embeds=embeds, image_latent=image_latent, clean_latent=None, added_time_ids=time_ids)
    v, _ = denoiser.velocity(ModelState.of(model.unet), z_t, sigma, cond)
    loss, per_clip = denoiser.edm_loss(denoiser.denoised(z_t, v, s), z, sigma)
    low = sigma < 1
    return loss, {
        "x0_mse": jnp.mean(per_clip), "x0_mse_low_sigma": jnp.sum(per_clip * low) / jnp.maximum(jnp.sum(low), 1)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What stage 2 needs to continue exactly: the float32 parameters, the optimizer state, the parameters'
    exponential moving average (what ships) and the step."""

    params: nnx.State
    opt_state: optax.OptState
    ema: nnx.State
    step: jax.Array  # int32 scalar


def unet_optimizer(cfg: UNetTrainConfig) -> optax.GradientTransformation:
    """Returns global-norm clipping then AdamW at unit learning rate: the step scales the update by the schedule's
    rate, so that the rate is an argument of the compiled step rather than a constant in it."""
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(1.0, weight_decay=cfg.weight_decay))


def init_train_state(trainables: Trainables, cfg: UNetTrainConfig) -> tuple[nnx.GraphDef, TrainState]:
    """Returns (graphdef, step 0) for `trainables` in float32 with XLA attention (`_for_training`): a fresh
    optimizer state, and the EMA starting at the parameters."""
    graphdef, params = nnx.split(Trainables(_for_training(trainables.unet), _for_training(trainables.image_encoder)))
    params = _float32(params)
    return graphdef, TrainState(params=params, opt_state=unet_optimizer(cfg).init(params),
                                ema=jax.tree.map(jnp.copy, params), step=jnp.zeros((), jnp.int32))


def ema_decay_at(step: jax.Array, decay: jax.Array) -> jax.Array:
    """Returns the EMA decay used after step `step`: min(decay, (1 + step)/(10 + step)), so the first steps do
    not freeze the EMA at its start."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_unet_step(graphdef: nnx.GraphDef, cfg: UNetTrainConfig) -> Callable:
    """Returns the jitted step `(TrainState, ClipPool, key, learning_rate, ema_decay) -> (TrainState, metrics)`:
    a batch of `cfg.batch_size` clips from the pool, one AdamW update, one EMA update. The state is donated.

    Configs that differ only in what the host computes (steps, schedule, rates, EMA decay) share one step, so a
    process compiles it once for the throughput measurement and the training that follows.
    """
    return _unet_step(graphdef, dataclasses.replace(cfg, steps=1, learning_rate=0.0, warmup=0, schedule="cosine",
                                                    ema_decay=0.0, cond_draws=1))


@functools.lru_cache(maxsize=8)
def _unet_step(graphdef: nnx.GraphDef, cfg: UNetTrainConfig) -> Callable:
    tx = unet_optimizer(cfg)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, pool: ClipPool, key: jax.Array, learning_rate: jax.Array,
             ema_decay: jax.Array) -> tuple[TrainState, dict]:
        batch_key, loss_key = jax.random.split(key)
        batch = draw_batch(pool, batch_key, cfg.batch_size)
        (loss, metrics), grads = jax.value_and_grad(unet_loss, has_aux=True)(state.params, graphdef, batch,
                                                                            loss_key, cfg)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, jax.tree.map(lambda u: learning_rate * u, updates))
        decay = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), state.ema, params)
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params=params, opt_state=opt_state, ema=ema, step=state.step + 1), metrics

    return step


def run_unet_steps(step: Callable, state: TrainState, pool: ClipPool, key: jax.Array, cfg: UNetTrainConfig, *,
                   on_log: Callable[[dict], None] = lambda r: None, log_every: int = 100,
                   deadline: float | None = None, until: int | None = None,
                   on_save: Callable[[TrainState], None] | None = None, save_every_s: float = 240.0) -> TrainState:
    """Returns the state after running `step` from `state.step` to `cfg.steps` (step i with fold_in(key, i), the
    rate and EMA decay of `cfg`), stopping early after step `until` or once `time.monotonic()` passes `deadline`.

    Logs the mean metrics of every `log_every` steps; calls `on_save(state)` every `save_every_s` seconds and
    at the end.
    """
    first = int(state.step)
    start = last_save = time.monotonic()
    sums, count = None, 0
    last = cfg.steps if until is None else min(until, cfg.steps)
    for i in range(first, last):
        rate = learning_rate_at(i, cfg.steps, cfg.warmup, cfg.learning_rate, cfg.schedule)
        state, metrics = step(state, pool, jax.random.fold_in(key, i), np.float32(rate), np.float32(cfg.ema_decay))
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count += 1
        now = time.monotonic()
        stopping = deadline is not None and now > deadline
        if (i + 1) % log_every == 0 or i + 1 == last or stopping:
            means = {k: float(v) / count for k, v in sums.items()}
            on_log({"stage": "unet", "step": i + 1, **means, "learning_rate": rate,
                    "clips_per_s": round((i + 1 - first) * cfg.batch_size / (time.monotonic() - start), 1)})
            sums, count = None, 0
        if on_save is not None and now - last_save > save_every_s:
            on_save(state)
            last_save = time.monotonic()
        if stopping:
            on_log({"stage": "unet", "stopped_by_deadline_at": i + 1, "planned_steps": cfg.steps})
            break
    if on_save is not None and int(state.step) > first:
        on_save(state)
    return state


def trainables_of(graphdef: nnx.GraphDef, params: nnx.State, like: Trainables) -> Trainables:
    """Returns the models holding `params` (the parameters or their EMA) under the configs of `like`."""
    trained = nnx.merge(graphdef, params)
    return Trainables(with_config(trained.unet, like.unet.config),
                      with_config(trained.image_encoder, like.image_encoder.config))


def train_unet(vae: VAE, videos: jax.Array, cfg: UNetTrainConfig, seed: int,
               on_log: Callable[[dict], None] = lambda r: None, log_every: int = 100,
               init: Trainables | None = None) -> tuple[Trainables, Trainables]:
    """Returns (trained, EMA) UNet + image encoder after `cfg.steps` steps on the uint8 videos `[N, F, H, W, 3]`
    with the frozen `vae`, from `init` or from scratch with the toy world's configs (a whole run in memory)."""
    if init is None:
        rngs = nnx.Rngs(seed)
        init = Trainables(UNet(models.unet_config(), rngs=rngs), ImageEncoder(models.image_encoder_config(),
                                                                                 rngs=rngs))
    pool = encode_videos(ModelState.of(vae), jnp.asarray(videos), jax.random.key(seed + 1), draws=cfg.cond_draws,
                         aug_log_mean=cfg.aug_log_mean, aug_log_std=cfg.aug_log_std)
    graphdef, state = init_train_state(init, cfg)
    state = run_unet_steps(make_unet_step(graphdef, cfg), state, pool, jax.random.key(seed), cfg, on_log=on_log,
                           log_every=log_every)
    return trainables_of(graphdef, state.params, init), trainables_of(graphdef, state.ema, init)


def held_out_x0_error(trainables: Trainables, pool: ClipPool, sigmas: Sequence[float], key: jax.Array, *,
                      batch_size: int = 8) -> dict[float, float]:
    """Returns {σ: mean squared x0 error} of the conditional model (no dropout, each clip's first conditioning draw)
    on every clip of `pool` at each noise level σ, the noise drawn from fold_in(key, index of σ): the same for every
    model, so two models' errors compare clip for clip."""
    graphdef, params = nnx.split(trainables)

    @jax.jit
    def error(params, batch: UNetBatch, sigma, noise):
        model = nnx.merge(graphdef, params)
        b = batch.latents.shape[0]
        embeds = model.image_encoder(clip_input(batch.first_frames, model.image_encoder.config.image_size))[:, None]
        time_ids = jnp.stack([jnp.full((b,), FPS - 1), jnp.full((b,), MOTION_BUCKET_ID), batch.aug], axis=-1)
        z = batch.latents.astype(jnp.float32)
        z_t = z + sigma * noise
        cond = Conditioning(image_embeds=embeds, image_latent=batch.image_latent.astype(jnp.float32),
                            clean_latent=None, added_time_ids=time_ids)
        v, _ = denoiser.velocity(ModelState.of(model.unet), z_t, sigma, cond)
        return jnp.sum(denoiser.x0_error(denoiser.denoised(z_t, v, sigma), z))

    errors = {}
    for i, sigma in enumerate(sigmas):
        noise = jax.random.normal(jax.random.fold_in(key, i), pool.latents.shape)
        total = 0.0
        for start in range(0, len(pool), batch_size):
            part = slice(start, start + batch_size)
            batch = UNetBatch(latents=pool.latents[part], first_frames=pool.first_frames[part],
                              image_latent=pool.cond_latents[part, 0], aug=pool.cond_aug[part, 0])
            total += float(error(params, batch, jnp.float32(sigma), noise[part]))
        errors[float(sigma)] = total / len(pool)
    return errors


# --------------------------------------------------------------------------------------------------
# Choosing the batch size from measured throughput.


def measure_throughput(graphdef: nnx.GraphDef, state: TrainState, pool: ClipPool, cfg: UNetTrainConfig,
                       batch_sizes: Sequence[int], *, steps: int = 10,
                       compiled: dict[int, Callable] | None = None) -> dict[int, dict[str, float]]:
    """Returns {batch size: {"clips_per_s", "step_s", "compile_s"}} of the stage-2 step, run on a copy of `state`
    (or {"clips_per_s": 0, "failed": the error} for a size that does not compile or run, e.g. out of memory).

    One size after the other: the first call's time (compile_s: the compilation, unless `compiled` holds the size's
    step already, and one step), then `steps` steps after a warm-up step. Compiling several at once gains nothing on
    one GPU, whose autotuning serializes them.
    """
    key = jax.random.key(0)
    results = {}
    for batch_size in batch_sizes:
        step = (compiled or {}).get(batch_size) or make_unet_step(graphdef, dataclasses.replace(
            cfg, batch_size=batch_size))
        trial = jax.tree.map(jnp.copy, state)
        try:
            start = time.perf_counter()
            for i in range(steps + 2):
                if i == 2:
                    jax.block_until_ready(trial)
                    start = time.perf_counter()
                trial, _ = step(trial, pool, jax.random.fold_in(key, i), np.float32(0), np.float32(0))
                if i == 0:
                    jax.block_until_ready(trial)
                    compile_s = time.perf_counter() - start
            jax.block_until_ready(trial)
        except jax.errors.JaxRuntimeError as error:
            log.warning("batch size %d failed: %s", batch_size, str(error).splitlines()[0])
            results[batch_size] = {"clips_per_s": 0.0, "failed": str(error).splitlines()[0][:200]}
            continue
        finally:
            trial = None
        step_s = (time.perf_counter() - start) / steps
        results[batch_size] = {"clips_per_s": round(batch_size / step_s, 1), "step_s": round(step_s, 5),
                               "compile_s": round(compile_s, 1)}
    return results


def compile_in_background(graphdef: nnx.GraphDef, state: TrainState, pool: ClipPool, cfg: UNetTrainConfig,
                          batch_sizes: Sequence[int],
                          on_log: Callable[[dict], None] = lambda r: None) -> concurrent.futures.Future:
    """Returns a future of {batch size: compiled stage-2 step}: the steps are traced here, on `state` and `pool` as
    arrays or shapes (`jax.ShapeDtypeStruct`), and compiled one after the other in a thread, so that compilation
    (autotuning on the GPU) overlaps with rendering and encoding the pool. A size that fails to compile maps to
    its error. The persistent compilation cache, when enabled, keeps the programs for later processes. `on_log` gets
    each size's compile time when it is done (from the thread)."""
    key = jax.random.key(0)
    lowered = {b: make_unet_step(graphdef, dataclasses.replace(cfg, batch_size=b)).lower(
        state, pool, key, np.float32(0), np.float32(0)) for b in batch_sizes}

    def compile_all() -> dict[int, Callable | Exception]:
        compiled = {}
        for batch_size, program in lowered.items():
            start = time.monotonic()
            try:
                compiled[batch_size] = program.compile()
            except jax.errors.JaxRuntimeError as error:
                compiled[batch_size] = error
            on_log({"stage": "compile", "batch_size": batch_size, "seconds": round(time.monotonic() - start, 1),
                    "failed": isinstance(compiled[batch_size], Exception)})
        return compiled

    return concurrent.futures.ThreadPoolExecutor(1).submit(compile_all)


def pool_shapes(vae: VAE, videos: int, cfg: UNetTrainConfig,
                world_cfg: world.WorldConfig = world.WorldConfig()) -> ClipPool:
    """Returns the shapes and dtypes (`jax.ShapeDtypeStruct`) of the ClipPool of `videos` videos, without
    rendering or encoding anything."""
    frames = jax.ShapeDtypeStruct((videos, world_cfg.num_frames, world_cfg.height, world_cfg.width, 3), jnp.uint8)
    return jax.eval_shape(functools.partial(encode_videos, draws=cfg.cond_draws, aug_log_mean=cfg.aug_log_mean,
                                            aug_log_std=cfg.aug_log_std), ModelState.of(vae), frames,
                          jax.random.key(0))


def choose_batch_size(throughput: dict[int, dict[str, float]], within: float = 0.9) -> int:
    """Returns the smallest measured batch size whose clips/s is within `within` of the best one: more clips per
    second buys little beyond it, while smaller batches give more updates per clip. Sizes that failed (out of
    memory) are never chosen; if all failed, this exits naming them, before the run is recorded."""
    ran = {b: r for b, r in throughput.items() if "failed" not in r and r["clips_per_s"] > 0}
    if not ran:
        failures = "; ".join(f"{b}: {r.get('failed', 'no clips/s')}" for b, r in throughput.items())
        raise SystemExit(f"no batch size ran ({failures}): pass smaller --batch-sizes (the pool is kept).")
    best = max(r["clips_per_s"] for r in ran.values())
    return min(b for b, r in ran.items() if r["clips_per_s"] >= within * best)


def scaled_learning_rate(batch_size: int, base_rate: float, base_batch: int) -> float:
    """Returns `base_rate` · √(batch_size / base_batch): Adam's square-root rule from a rate known to train well at
    `base_batch`."""
    return base_rate * math.sqrt(batch_size / base_batch)


def ema_decay_for(steps: int, half_life_fraction: float = 0.05) -> float:
    """Returns the EMA decay whose half-life is `half_life_fraction` of `steps` (the EMA averages over the last
    few percent of the run)."""
    return 0.5 ** (1.0 / max(half_life_fraction * steps, 1.0))


# --------------------------------------------------------------------------------------------------
# Stage 3: GI's backward delta, on the pool.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairConditioning:
    """Per pool video, the conditioning of its first and last frames as GI's fine-tune builds it: image embeddings
    `[N, 1, D]`, and the unscaled latents `[N, h, w, C]` of the frames plus one shared noise draw × strength."""

    first_embeds: jax.Array
    last_embeds: jax.Array
    first_latent: jax.Array
    last_latent: jax.Array


def pair_conditioning(vae: ModelState[VAE], image_encoder: ModelState[ImageEncoder], pool: ClipPool,
                      key: jax.Array, noise_aug_strength: float, chunk: int = 1024) -> PairConditioning:
    """Returns the PairConditioning of every pool video (its first and last frames share one noise draw, as in
    `finetune.encode_clips`), computed in chunks of `chunk` videos."""

    @jax.jit
    def encode(first, last, chunk_key):
        vae_model, encoder = vae.merge(), image_encoder.merge()
        size = encoder.config.image_size
        noise = jax.random.normal(chunk_key, first.shape)
        return PairConditioning(
            first_embeds=encoder(clip_input(first, size))[:, None], last_embeds=encoder(clip_input(last, size))[:, None],
            first_latent=vae_model.encode(_pixels(first) + noise_aug_strength * noise),
            last_latent=vae_model.encode(_pixels(last) + noise_aug_strength * noise))

    parts = [encode(pool.first_frames[i:i + chunk], pool.last_frames[i:i + chunk], jax.random.fold_in(key, i))
             for i in range(0, len(pool), chunk)]
    return jax.tree.map(lambda *arrays: jnp.concatenate(arrays), *parts)


@functools.cache
def make_backward_step(batch_size: int, noise_aug_strength: float, train_cfg: finetune.TrainConfig) -> Callable:
    """Returns the jitted step `(UNet state, finetune.TrainState, ClipPool, PairConditioning, key) -> (state,
    metrics)`: `batch_size` pool clips reversed in time, conditioned on their last frame with the forward model's
    maps from their first (`finetune.train_step`), at GI's time ids; one per settings, so a resumed run reuses it."""
    from jinbetween import finetune

    time_ids = conditioning.added_time_ids(FPS, MOTION_BUCKET_ID, noise_aug_strength)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(unet, train_state, pool, pairs, key):
        index_key, step_key = jax.random.split(key)
        index = jax.random.randint(index_key, (batch_size,), 0, len(pool))
        ids = jnp.broadcast_to(time_ids, (batch_size, time_ids.shape[-1]))
        batch = finetune.ClipBatch(
            latents=denoiser.flip_time(pool.latents[index]).astype(jnp.float32),
            cond=Conditioning(image_embeds=pairs.last_embeds[index], image_latent=pairs.last_latent[index],
                              clean_latent=None, added_time_ids=ids),
            reference=Conditioning(image_embeds=pairs.first_embeds[index], image_latent=pairs.first_latent[index],
                                   clean_latent=None, added_time_ids=ids))
        return finetune.train_step(unet, train_state, batch, step_key, train_cfg)

    return step


def train_backward_delta(unet: UNet, image_encoder: ImageEncoder, vae: VAE, pool: ClipPool, *, steps: int,
                         batch_size: int, seed: int, learning_rate: float = 1e-4, noise_aug_strength: float = 0.02,
                         deadline: float | None = None, on_log: Callable[[dict], None] = lambda r: None,
                         log_every: int = 100, start: finetune.TrainState | None = None) -> finetune.TrainState:
    """Returns the `finetune.TrainState` (GI's backward delta {diffusers key: float32 [in, out]}, its optimizer
    state, the steps taken) trained up to step `steps` on `unet` (frozen, in its dtype) with pool clips, conditioned
    as GI trained (fps 7, motion bucket 127, `noise_aug_strength`). From `start`, a state this function returned
    with the same arguments, it continues as if it had not stopped."""
    from jinbetween import finetune

    train_cfg = finetune.TrainConfig(learning_rate=learning_rate)
    unet_state = ModelState.of(_for_training(unet))
    pairs = pair_conditioning(ModelState.of(vae), ModelState.of(image_encoder), pool, jax.random.key(seed + 1),
                              noise_aug_strength)
    step = make_backward_step(batch_size, noise_aug_strength, train_cfg)
    state = start if start is not None else finetune.init_train_state(unet_state, train_cfg)
    key, sums, count = jax.random.key(seed), None, 0
    for i in range(int(state.step), steps):
        state, metrics = step(unet_state, state, pool, pairs, jax.random.fold_in(key, i))
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count += 1
        stopping = deadline is not None and time.monotonic() > deadline
        if (i + 1) % log_every == 0 or i + 1 == steps or stopping:
            on_log({"stage": "gi_backward", "step": i + 1, **{k: float(v) / count for k, v in sums.items()}})
            sums, count = None, 0
        if stopping:
            on_log({"stage": "gi_backward", "stopped_by_deadline_at": i + 1, "planned_steps": steps})
            break
    return jax.device_get(state)


# --------------------------------------------------------------------------------------------------
# A run folder: settings, encoded pool, checkpoints of the full TrainState, log.


RUN_RECORD, POOL, CHECKPOINTS, LOG = "run.json", "pool", "checkpoints", "train_log.jsonl"


def _state_tree(state: TrainState) -> dict:
    """The TrainState as a flat dict of numbered leaves, the form the checkpoint stores."""
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def _state_from_tree(tree: dict, like: TrainState) -> TrainState:
    return jax.tree.unflatten(jax.tree.structure(like), [tree[k] for k in sorted(tree)])


class Run:
    """A stage-2 run folder (see the module docstring): its record, pool, checkpoints and log."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def exists(self) -> bool:
        return (self.folder / RUN_RECORD).exists()

    def record(self) -> dict:
        return json.loads((self.folder / RUN_RECORD).read_text())

    def write_record(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / (RUN_RECORD + ".tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        temporary.replace(self.folder / RUN_RECORD)

    def config(self) -> UNetTrainConfig:
        return UNetTrainConfig(**self.record()["config"])

    def log(self, record: dict) -> None:
        log.info(json.dumps(record))
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOG, "a") as file:
            file.write(json.dumps(record) + "\n")

    def log_records(self) -> list[dict]:
        path = self.folder / LOG
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def save_state(self, state: TrainState) -> None:
        from jinbetween.checkpoint import TrainingCheckpoints

        with TrainingCheckpoints(self.folder / CHECKPOINTS, keep=2) as checkpoints:
            checkpoints.save(int(state.step), _state_tree(state), {"step": int(state.step)})
        self.log({"stage": "unet", "saved_step": int(state.step)})

    def restore_state(self, like: TrainState) -> TrainState | None:
        """Returns the newest saved TrainState (shaped like `like`), or None when none was saved yet."""
        from jinbetween.checkpoint import TrainingCheckpoints

        with TrainingCheckpoints(self.folder / CHECKPOINTS, keep=2) as checkpoints:
            latest = checkpoints.latest_step()
            if latest is None:
                return None
            tree, _ = checkpoints.restore(latest, _state_tree(jax.eval_shape(lambda: like)))
        # Restored arrays are committed to a device, which the compiled step's signature records; through the host
        # they come back uncommitted, as a fresh state is, so the step compiled for a fresh run is found in the cache.
        return _state_from_tree({k: jnp.asarray(np.asarray(v)) for k, v in tree.items()}, like)


def _init_folder(record: dict) -> Path | None:
    return None if record["init"] == "scratch" else Path(record["init"])


def _load_trainables(folder: Path | None, seed: int) -> Trainables:
    if folder is None:
        rngs = nnx.Rngs(seed)
        return Trainables(UNet(models.unet_config(), rngs=rngs), ImageEncoder(models.image_encoder_config(),
                                                                                 rngs=rngs))
    return Trainables(load_unet(folder, dtype=jnp.float32),
                      load_image_encoder(folder, dtype=jnp.float32))


def environment() -> dict:
    """Returns the device and software a run used, for its record."""
    import flax

    return {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
            "flax": flax.__version__, "python": platform.python_version()}


def start_new_run(init: Path | None, vae_folder: Path, seed: int, videos: int, base: UNetTrainConfig,
                  batch_sizes: Sequence[int], on_log: Callable[[dict], None] = lambda r: None
                  ) -> tuple[VAE, nnx.GraphDef, TrainState, concurrent.futures.Future]:
    """Returns (the VAE, graphdef, step-0 state, the future of the compiled steps) of a new run from `init` (None:
    from scratch): the steps are traced on the shapes of a pool of `videos` videos and compile in the background
    (`compile_in_background`). `on_log` gets the set-up's stages."""
    start = time.monotonic()
    vae = load_vae(vae_folder, dtype=jnp.float32)
    graphdef, state = init_train_state(_load_trainables(init, seed), base)
    on_log({"stage": "setup", "loaded": True, "seconds": round(time.monotonic() - start, 1)})
    compiling = compile_in_background(graphdef, state, pool_shapes(vae, videos, base), base, batch_sizes,
                                      on_log=on_log)
    on_log({"stage": "setup", "traced": True, "seconds": round(time.monotonic() - start, 1)})
    return vae, graphdef, state, compiling


def create_run(run: Run, args: argparse.Namespace) -> tuple[UNetTrainConfig, TrainState, ClipPool, Callable]:
    """Creates the run folder: the pool rendered and encoded while the steps compile, the batch size chosen from
    measured throughput, the learning rate, steps and EMA decay derived from it; returns (config, step-0 state,
    pool, the compiled step of the chosen batch size)."""
    start = time.monotonic()
    base = UNetTrainConfig(batch_size=args.batch_sizes[0], learning_rate=args.base_learning_rate,
                           warmup=args.warmup, cond_draws=args.cond_draws)
    seeds = world.split_seeds("train", args.videos)
    vae, graphdef, state, compiling = start_new_run(args.init, args.vae or args.init, args.seed, args.videos, base,
                                                    args.batch_sizes, on_log=run.log)
    if (run.folder / POOL / "cond_aug.npy").exists():  # encoded by an earlier attempt at creating this run
        pool = load_pool(run.folder / POOL)
        if len(pool) != args.videos:
            raise SystemExit(f"{run.folder / POOL} holds {len(pool)} videos, not --videos {args.videos}.")
        run.log({"stage": "pool", "loaded": len(pool), "seconds": round(time.monotonic() - start, 1)})
    else:
        pool = build_pool(vae, seeds, jax.random.key(args.seed), base, on_log=run.log)
        jax.block_until_ready(pool)
        run.folder.mkdir(parents=True, exist_ok=True)
        save_pool(pool, run.folder / POOL)
        run.log({"stage": "pool", "videos": len(pool), "seconds": round(time.monotonic() - start, 1)})
    compiled = compiling.result()
    run.log({"stage": "compiled", "seconds": round(time.monotonic() - start, 1)})
    throughput = measure_throughput(graphdef, state, pool, base, args.batch_sizes, compiled={
        b: step for b, step in compiled.items() if not isinstance(step, Exception)})
    run.log({"stage": "throughput", **{str(b): r for b, r in throughput.items()}})
    batch_size = choose_batch_size(throughput)
    rate = scaled_learning_rate(batch_size, args.base_learning_rate, args.base_batch)
    clips_per_s = throughput[batch_size]["clips_per_s"]
    steps = args.steps or max(int(clips_per_s * args.train_minutes * 60 / batch_size), 1)
    cfg = dataclasses.replace(base, batch_size=batch_size, learning_rate=rate, steps=steps,
                              ema_decay=ema_decay_for(steps))
    run.write_record({
        "config": dataclasses.asdict(cfg), "seed": args.seed, "videos": args.videos, "train_seeds": [seeds[0],
                                                                                                     seeds[-1]],
        "init": str(args.init) if args.init else "scratch", "vae": str(args.vae or args.init),
        "throughput": {str(b): r for b, r in throughput.items()},
        "choice": {"batch_size": batch_size, "learning_rate": rate, "rule": f"smallest batch within 90% of the best "
                   f"clips/s; rate {args.base_learning_rate:g} · √(B/{args.base_batch}); steps = clips/s × "
                   f"{args.train_minutes} min / B; EMA half-life 5% of the steps"},
        "environment": environment()})
    run.log({"stage": "plan", "batch_size": batch_size, "learning_rate": rate, "steps": steps,
             "ema_decay": cfg.ema_decay, "setup_seconds": round(time.monotonic() - start, 1)})
    step = compiled.get(batch_size)
    return cfg, state, pool, step if callable(step) else make_unet_step(graphdef, cfg)


def train_run(args: argparse.Namespace) -> None:
    """`unet`: creates the run (pool, throughput, plan) or continues it, then trains until the planned steps or the
    deadline, saving the full state."""
    deadline = time.monotonic() + args.deadline_minutes * 60 if args.deadline_minutes else None
    run = Run(args.run)
    if run.exists:
        cfg = run.config()
        if args.steps and args.steps != cfg.steps:
            cfg = dataclasses.replace(cfg, steps=args.steps)
            record = run.record()
            run.write_record({**record, "config": dataclasses.asdict(cfg)})
            run.log({"stage": "plan", "steps": cfg.steps, "extended": True})
        record = run.record()
        graphdef, state = init_train_state(_load_trainables(_init_folder(record), record["seed"]), cfg)
        restored = run.restore_state(state)
        state = restored if restored is not None else state
        pool = load_pool(run.folder / POOL)
        step = make_unet_step(graphdef, cfg)
        run.log({"stage": "resume", "step": int(state.step), "planned_steps": cfg.steps})
    else:
        if args.init is None and args.vae is None:
            raise SystemExit("A new run needs --init (a pipeline to start from) or --vae (a trained VAE).")
        cfg, state, pool, step = create_run(run, args)
    run_unet_steps(step, state, pool, jax.random.key(run.record()["seed"] + 1), cfg, on_log=run.log,
                   log_every=args.log_every, deadline=deadline, on_save=run.save_state)


def release_run(args: argparse.Namespace) -> None:
    """`release`: GI's delta on the EMA models, then the pipeline in bf16 with its release manifest and samples."""
    from jinbetween.pipeline import Pipeline
    from jinbetween.toyworld.bench import contact_sheet
    from jinbetween.weights.delta import BACKWARD_DELTA, save_delta
    from jinbetween.weights.release import write_release

    deadline = time.monotonic() + args.deadline_minutes * 60 if args.deadline_minutes else None
    run = Run(args.run)
    cfg, record = run.config(), run.record()
    init = _load_trainables(_init_folder(record), record["seed"])
    graphdef, state = init_train_state(init, cfg)
    state = run.restore_state(state)
    if state is None:
        raise SystemExit(f"{run.folder} has no checkpoint yet: train it first (`unet --run {run.folder}`).")
    shipped = trainables_of(graphdef, _bf16(state.ema), init)
    base = Pipeline.from_pretrained(Path(record["vae"]), dtype=jnp.float32)
    vae = base.vae
    pool = load_pool(run.folder / POOL)
    gi_state = train_backward_delta(
        shipped.unet, shipped.image_encoder, vae, pool, steps=args.gi_steps, batch_size=args.gi_batch_size,
        seed=record["seed"] + 2, learning_rate=args.gi_learning_rate, deadline=deadline, on_log=run.log)
    delta, gi_steps = gi_state.delta, int(gi_state.step)
    out = Path(args.out)
    pipeline = Pipeline(shipped.unet, vae, shipped.image_encoder, clip_mean=base.clip_mean, clip_std=base.clip_std,
                        sigma_min=base.sigma_min, sigma_max=base.sigma_max, default_size=base.default_size)
    pipeline.save_pretrained(out, dtype=jnp.bfloat16)
    gi_losses = [r["loss"] for r in run.log_records() if r.get("stage") == "gi_backward" and "loss" in r]
    save_delta(out / BACKWARD_DELTA, delta, shipped.unet.config, trained_steps=gi_steps,
               base="the EMA UNet of this release, in bf16", batch_size=args.gi_batch_size,
               learning_rate=args.gi_learning_rate, noise_aug_strength=0.02)
    unet_logs = [r for r in run.log_records() if r.get("stage") == "unet" and "loss" in r]
    write_release(out, {
        "environment": record["environment"], "data": {"videos": record["videos"], "train_seeds": record["train_seeds"]},
        "init": record["init"], "vae": "unchanged from the previous release (frozen)",
        "unet_and_image_encoder": {"config": record["config"], "throughput": record["throughput"],
                                   "choice": record["choice"], "steps_trained": int(state.step),
                                   "clips_seen": int(state.step) * cfg.batch_size,
                                   "shipped": "the EMA of the parameters, in bf16",
                                   "last_logged": unet_logs[-1] if unet_logs else None},
        "gi_backward": {"steps": gi_steps, "batch_size": args.gi_batch_size, "learning_rate": args.gi_learning_rate,
                        "loss_first_logged": gi_losses[0] if gi_losses else None,
                        "loss_last_logged": gi_losses[-1] if gi_losses else None},
        "log": "train_log.jsonl of the run (gzipped in docs/toyworld_logs/)"})
    held_out = np.stack([world.video(s) for s in world.split_seeds("validation", 4)])
    released = Pipeline.from_pretrained(out)
    samples = released.image_to_video(list(held_out[:, 0]), key=jax.random.key(0))
    contact_sheet({name: video for i, (t, v) in enumerate(zip(held_out, samples))
                   for name, video in ((f"{i}: true", t), (f"{i}: sampled", v))}, every=2).save(
        run.folder / "i2v_samples.png")
    run.log({"stage": "release", "out": str(out), "unet_steps": int(state.step), "gi_steps": gi_steps})


EVALUATION_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 15.0, 50.0)


def evaluate_run(args: argparse.Namespace) -> None:
    """`evaluate`: held-out x0 errors of pipelines on the same validation clips and noise (`held_out_x0_error`)."""
    vae = load_vae(args.weights[0], dtype=jnp.float32)
    seeds = world.split_seeds("validation", args.videos)
    # One conditioning draw per clip at the samplers' default strength, 0.02.
    pool = encode_videos(ModelState.of(vae), jnp.asarray(np.stack([world.video(s) for s in seeds])),
                         jax.random.key(0), draws=1, aug_log_mean=math.log(0.02), aug_log_std=0.0)
    record = {"validation_seeds": [seeds[0], seeds[-1]], "sigmas": list(EVALUATION_SIGMAS), "errors": {}}
    for folder in args.weights:
        trainables = Trainables(load_unet(folder, dtype=jnp.float32),
                                load_image_encoder(folder, dtype=jnp.float32))
        record["errors"][str(folder)] = held_out_x0_error(trainables, pool, EVALUATION_SIGMAS, jax.random.key(1))
        log.info("%s: %s", folder, json.dumps(record["errors"][str(folder)]))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


def vae_run(args: argparse.Namespace) -> None:
    """`vae`: stage 1 into `--out/vae`, with reconstructions of held-out videos."""
    from jinbetween.toyworld.bench import contact_sheet
    from jinbetween.weights.loading import VAE_COMPONENT, save_model_folder

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / LOG, "a") as log_file:
        def on_log(record: dict) -> None:
            log.info(json.dumps(record))
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        pool = jnp.asarray(render_pool(world.split_seeds("train", args.videos)))
        init = load_vae(args.vae_resume, dtype=jnp.float32) if args.vae_resume else None
        vae = train_vae(pool, VAETrainConfig(steps=args.vae_steps, batch_clips=args.vae_batch), args.seed, on_log,
                        time_limit=args.minutes * 60 if args.minutes else None, init=init)
        save_model_folder(vae, args.out / "vae", VAE_COMPONENT)
        held_out = np.stack([world.video(s) for s in world.split_seeds("validation", 4)])
        decoded = np.stack([np.asarray(vae.decode_video(vae.config.scaling_factor * vae.encode(_pixels(v))))
                            for v in held_out])
        reconstructed = np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
        psnr = -10 * np.log10(np.mean((reconstructed / 255 - held_out / 255) ** 2))
        on_log({"stage": "vae", "scaling_factor": vae.config.scaling_factor, "validation_psnr": float(psnr)})
        contact_sheet({name: video for i, (t, r) in enumerate(zip(held_out, reconstructed))
                       for name, video in ((f"{i}: true", t), (f"{i}: reconstructed", r))}, every=2).save(
            args.out / "vae_reconstructions.png")


def main(argv: list[str] | None = None, prog: str = "jinbetween toytrain") -> None:
    """Runs one training command (`jinbetween toytrain COMMAND ...`, or `python -m jinbetween.toyworld.train`)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    unet = commands.add_parser("unet", help="stage 2: create or continue a run (UNet + image encoder)")
    unet.add_argument("--run", required=True, type=Path, help="the run folder (created, or continued if it exists)")
    unet.add_argument("--init", type=Path, help="a pipeline folder to start the UNet, image encoder and VAE from")
    unet.add_argument("--vae", type=Path, help="a folder with the frozen VAE (default: --init's)")
    unet.add_argument("--videos", type=int, default=48000, help="training videos rendered into the pool")
    unet.add_argument("--cond-draws", type=int, default=UNetTrainConfig.cond_draws,
                      help="noise-augmented encodings of each first frame")
    unet.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512],
                      help="batch sizes to measure; the run takes the smallest within 90%% of the best clips/s")
    unet.add_argument("--base-learning-rate", type=float, default=2e-4, help="rate known to train at --base-batch")
    unet.add_argument("--base-batch", type=int, default=32)
    unet.add_argument("--warmup", type=int, default=UNetTrainConfig.warmup)
    unet.add_argument("--train-minutes", type=float, default=15.0,
                      help="planned training time of the whole run: sets its steps from the measured throughput")
    unet.add_argument("--steps", type=int, help="planned steps instead (on an existing run: extends its plan)")
    unet.add_argument("--deadline-minutes", type=float, help="stop this process after this many minutes, saved")
    unet.add_argument("--log-every", type=int, default=200)
    unet.add_argument("--seed", type=int, default=0)
    unet.set_defaults(run_command=train_run)

    release = commands.add_parser("release", help="stage 3 and export: GI delta, bf16 pipeline, release.json")
    release.add_argument("--run", required=True, type=Path)
    release.add_argument("--out", required=True, type=Path, help="the release folder to write")
    release.add_argument("--gi-steps", type=int, default=3000)
    release.add_argument("--gi-batch-size", type=int, default=32)
    release.add_argument("--gi-learning-rate", type=float, default=1e-4)
    release.add_argument("--deadline-minutes", type=float, help="stop GI's fine-tune after this many minutes")
    release.set_defaults(run_command=release_run)

    evaluate = commands.add_parser("evaluate", help="held-out x0 error of pipelines at fixed noise levels")
    evaluate.add_argument("weights", nargs="+", type=Path, help="pipeline folders (the first one's VAE encodes)")
    evaluate.add_argument("--videos", type=int, default=32, help="validation videos")
    evaluate.add_argument("--out", type=Path, help="write the errors as JSON here")
    evaluate.set_defaults(run_command=evaluate_run)

    vae = commands.add_parser("vae", help="stage 1: the VAE")
    vae.add_argument("--out", required=True, type=Path, help="run folder: train_log.jsonl, vae/, reconstructions")
    vae.add_argument("--videos", type=int, default=20000, help="training videos rendered into the pool")
    vae.add_argument("--vae-steps", type=int, default=VAETrainConfig.steps)
    vae.add_argument("--vae-batch", type=int, default=VAETrainConfig.batch_clips, help="VAE clips per step")
    vae.add_argument("--vae-resume", type=Path, help="a folder with a vae/ to start from")
    vae.add_argument("--minutes", type=float, help="stop early after this many minutes (the log says so)")
    vae.add_argument("--seed", type=int, default=0)
    vae.set_defaults(run_command=vae_run)

    args = parser.parse_args(argv)
    logs.configure()
    if args.command in ("unet", "release"):
        from jinbetween import compile_cache

        compile_cache.enable(args.run / "xla_cache")
    args.run_command(args)


if __name__ == "__main__":
    main(prog="python -m jinbetween.toyworld.train")
