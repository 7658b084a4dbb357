"""Train the toy world's models from scratch: the VAE on frames, then the image-to-video UNet with its image encoder.

Stage 1 (`train_vae`): the SVD VAE (per-frame encoder, temporal decoder) on 14-frame clips, L1 reconstruction plus
a small KL term; `scaling_factor` is then set to 1 / the standard deviation of the training latents.
Stage 2 (`train_unet`): SVD's objective with the VAE frozen. EDM v-prediction with ln σ ~ N(0.7, 1.6²) and the
weight (1 + σ²)/σ² on x0 (σ_data = 1), the first frame as conditioning (its noise-augmented latent concatenated
to every frame, augmentation strength ~ lognormal(−3, 0.5) fed as the third time id, its clean image through the
image encoder, trained jointly), and both conditionings zeroed together for `cond_dropout` of the clips, which is
what classifier-free guidance asks of the model at sampling time.
Stage 3, the GI backward delta, is the library's own fine-tune: `jinbetween finetune` on `write_dataset` videos.

Every clip comes from a pool of toy-world videos rendered once (in parallel) and kept on the device; a step's
batch and noise are functions of (seed, step). Parameters train in float32, the forward pass runs in bf16.

    python -m jinbetween.toyworld.train --out runs/toy --videos 20000 --vae-steps 4000 --unet-steps 8000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import multiprocessing
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jinbetween import conditioning, schedule
from jinbetween.config import VAEConfig
from jinbetween.models import VAE, ImageEncoder, UNet
from jinbetween.models.state import ModelState
from jinbetween.toyworld import models, world

log = logging.getLogger(__name__)

FPS = 7.0  # the world's frame rate: time id fps − 1 = 6
MOTION_BUCKET_ID = 127.0  # fixed: the toy world has no motion-strength labels
# "constant" (after warm-up) suits a run that a time limit may cut and a later run continues with "cosine".
SCHEDULES = ("cosine", "constant")


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
    """Stage 2: SVD's objective (see the module docstring), AdamW with warm-up and cosine decay."""

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

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; choose one of {SCHEDULES}.")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"UNetTrainConfig needs steps >= 1 and batch_size >= 1, got {self.steps}, "
                             f"{self.batch_size}.")


def _render_seed(seed: int) -> np.ndarray:
    return world.video(seed)


def render_pool(seeds: list[int], workers: int | None = None) -> np.ndarray:
    """Returns the videos of `seeds` as uint8 `[N, F, H, W, 3]` (default WorldConfig), rendered in `workers`
    processes (all cores by default)."""
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return np.stack(pool.map(_render_seed, seeds, chunksize=64))


def _schedule(steps: int, warmup: int, peak: float, kind: str = "cosine") -> optax.Schedule:
    warmup = min(warmup, steps - 1)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, 2), peak / 20)


def with_config(module: nnx.Module, config) -> nnx.Module:
    """Returns `module`'s parameters under another config of the same architecture (a VAE's scaling factor, an
    attention kernel)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: type(module)(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(module))


def _for_training(module: nnx.Module) -> nnx.Module:
    """XLA attention: cuDNN's fused attention has no backward pass for some of these short sequences (65 tokens)."""
    return with_config(module, module.config.replace(attention_impl="xla"))


def _bf16(state: nnx.State) -> nnx.State:
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)


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

    state, opt_state = _run("vae", step, state, opt_state, cfg.steps, jax.random.key(seed), on_log, log_every,
                            time_limit, pool)
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
# Stage 2: the UNet and the image encoder.


def encode_pool(vae: VAE, pool: jax.Array, batch: int = 64) -> jax.Array:
    """Returns scaling_factor × posterior means of every pool video, bf16 `[N, F, h, w, C]`."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def encode(frames):
        model = nnx.merge(graphdef, state)
        b, f = frames.shape[:2]
        z = model.config.scaling_factor * model.encode(_pixels(frames.reshape(b * f, *frames.shape[2:])))
        return z.reshape(b, f, *z.shape[1:]).astype(jnp.bfloat16)

    return jnp.concatenate([encode(pool[i:i + batch]) for i in range(0, pool.shape[0], batch)])


def clip_input(frames: jax.Array, size: int) -> jax.Array:
    """Returns the image encoder input `[B, S, S, 3]` of uint8 frames `[B, H, W, 3]`: `conditioning.clip_pixels`
    (anti-aliased bicubic resize, CLIP normalization) as device matmuls."""
    x = _pixels(frames)
    rows = jnp.asarray(conditioning._resize_matrix(frames.shape[1], size), jnp.float32)
    cols = jnp.asarray(conditioning._resize_matrix(frames.shape[2], size), jnp.float32)
    resized = jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols, precision="highest")
    mean, std = jnp.asarray(conditioning.CLIP_MEAN), jnp.asarray(conditioning.CLIP_STD)
    return ((resized + 1) / 2 - mean) / std


class Trainables(nnx.Module):
    """The two models stage 2 trains together."""

    def __init__(self, unet: UNet, image_encoder: ImageEncoder):
        self.unet, self.image_encoder = unet, image_encoder


def unet_loss(state: nnx.State, graphdef: nnx.GraphDef, vae: ModelState[VAE], latents: jax.Array,
              first_frames: jax.Array, key: jax.Array, cfg: UNetTrainConfig) -> tuple[jax.Array, dict]:
    """Returns (the EDM-weighted x0 loss, metrics) of the UNet + image encoder on one batch.

    latents: `[B, F, h, w, C]` scaled clip latents; first_frames: uint8 `[B, H, W, 3]`, the clips' first frames.
    """
    model = nnx.merge(graphdef, _bf16(state))
    b = latents.shape[0]
    sigma_key, eps_key, aug_key, aug_noise_key, drop_key = jax.random.split(key, 5)
    sigma = jnp.exp(cfg.p_mean + cfg.p_std * jax.random.normal(sigma_key, (b,)))
    aug = jnp.exp(cfg.aug_log_mean + cfg.aug_log_std * jax.random.normal(aug_key, (b,)))
    pixels = _pixels(first_frames)
    noisy_pixels = pixels + aug[:, None, None, None] * jax.random.normal(aug_noise_key, pixels.shape)
    image_latent = jax.lax.stop_gradient(vae.merge().encode(noisy_pixels))
    embeds = model.image_encoder(clip_input(first_frames, model.image_encoder.config.image_size))[:, None]
    keep = (jax.random.uniform(drop_key, (b,)) >= cfg.cond_dropout).astype(jnp.float32)
    image_latent = image_latent * keep[:, None, None, None]
    embeds = embeds * keep[:, None, None].astype(embeds.dtype)
    time_ids = jnp.stack([jnp.full((b,), FPS - 1), jnp.full((b,), MOTION_BUCKET_ID), aug], axis=-1)

    z = latents.astype(jnp.float32)
    s = sigma[:, None, None, None, None]
    z_t = z + s * jax.random.normal(eps_key, z.shape)
    frames = jnp.broadcast_to(image_latent[:, None], z.shape[:2] + image_latent.shape[1:])
    v = model.unet(jnp.concatenate([schedule.c_in(s) * z_t, frames], axis=-1), schedule.c_noise(sigma), embeds,
                   time_ids).astype(jnp.float32)
    squared = (schedule.denoised(z_t, v, s) - z) ** 2
    loss = jnp.mean((1 + s**2) / s**2 * squared)
    return loss, {"x0_mse": jnp.mean(squared), "x0_mse_low_sigma": jnp.sum(jnp.mean(squared, (1, 2, 3, 4)) *
                                                                            (sigma < 1)) / jnp.maximum(
        jnp.sum(sigma < 1), 1)}


def train_unet(vae: VAE, pool: jax.Array, cfg: UNetTrainConfig, seed: int,
               on_log: Callable[[dict], None] = lambda r: None, log_every: int = 100,
               init: Trainables | None = None, time_limit: float | None = None) -> Trainables:
    """Returns the UNet and image encoder trained with the frozen `vae` on the uint8 pool `[N, F, H, W, 3]`
    (from `init` if given, else from scratch with the toy world's configs)."""
    latents = encode_pool(vae, pool)
    first_frames = pool[:, 0]
    vae_state = ModelState.of(vae)
    if init is None:
        rngs = nnx.Rngs(seed)
        init = Trainables(UNet(models.unet_config(), rngs=rngs), ImageEncoder(models.image_encoder_config(),
                                                                                 rngs=rngs))
    graphdef, state = nnx.split(Trainables(_for_training(init.unet), _for_training(init.image_encoder)))
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(_schedule(cfg.steps, cfg.warmup, cfg.learning_rate, cfg.schedule),
                                 weight_decay=cfg.weight_decay))
    opt_state = tx.init(state)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(state, opt_state, step_key, latents, first_frames):
        batch_key, loss_key = jax.random.split(step_key)
        index = jax.random.randint(batch_key, (cfg.batch_size,), 0, latents.shape[0])
        (loss, metrics), grads = jax.value_and_grad(unet_loss, has_aux=True)(
            state, graphdef, vae_state, latents[index], first_frames[index], loss_key, cfg)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, {"loss": loss, **metrics}

    state, opt_state = _run("unet", step, state, opt_state, cfg.steps, jax.random.key(seed), on_log, log_every,
                            time_limit, latents, first_frames)
    trained = nnx.merge(graphdef, state)
    return Trainables(with_config(trained.unet, init.unet.config), with_config(trained.image_encoder,
                                                                                init.image_encoder.config))


def _run(stage: str, step, state, opt_state, steps: int, key: jax.Array, on_log, log_every: int,
         time_limit: float | None, *data):
    """Runs `steps` steps (step i with fold_in(key, i)), reporting mean metrics every `log_every` steps; stops
    early, saying so, once `time_limit` seconds have passed (a guard for time-boxed machines: the learning-rate
    schedule still assumes `steps`)."""
    start, sums, count = time.perf_counter(), None, 0
    for i in range(steps):
        state, opt_state, metrics = step(state, opt_state, jax.random.fold_in(key, i), *data)
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count += 1
        elapsed = time.perf_counter() - start
        stopping = time_limit is not None and elapsed > time_limit
        if (i + 1) % log_every == 0 or i + 1 == steps or stopping:
            on_log({"stage": stage, "step": i + 1, **{k: float(v) / count for k, v in sums.items()},
                    "seconds": round(elapsed, 2)})
            sums, count = None, 0
        if stopping:
            on_log({"stage": stage, "stopped_early_at": i + 1, "planned_steps": steps})
            break
    return state, opt_state


# --------------------------------------------------------------------------------------------------
# The command line.


def _paired(label: str, truth: np.ndarray, videos: np.ndarray) -> dict[str, np.ndarray]:
    """{label: video} rows for a contact sheet: each true video, then the model's from its first frame."""
    return {name: video for i, (t, v) in enumerate(zip(truth, videos))
            for name, video in ((f"{i}: true", t), (f"{i}: {label}", v))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jinbetween.toyworld.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="run folder: train_log.jsonl, vae/, pipeline/, sheets")
    parser.add_argument("--videos", type=int, default=20000, help="training videos rendered into the pool")
    parser.add_argument("--vae-steps", type=int, default=VAETrainConfig.steps)
    parser.add_argument("--vae-batch", type=int, default=VAETrainConfig.batch_clips, help="VAE clips per step")
    parser.add_argument("--unet-steps", type=int, default=UNetTrainConfig.steps, help="0: train the VAE only")
    parser.add_argument("--batch-size", type=int, default=UNetTrainConfig.batch_size, help="UNet clips per step")
    parser.add_argument("--vae", type=Path, help="a folder with a trained vae/ to use instead of stage 1")
    parser.add_argument("--vae-resume", type=Path, help="a folder with a vae/ for stage 1 to start from")
    parser.add_argument("--unet-schedule", choices=SCHEDULES, default="cosine",
                        help="learning rate after warm-up (constant for a first part that a later run continues)")
    parser.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the saved pipeline's weights (the VAE of stage 1 is saved in float32)")
    parser.add_argument("--resume", type=Path, help="a folder with the unet/ and image_encoder/ to start from")
    parser.add_argument("--minutes", type=float, nargs=2, metavar=("VAE", "UNET"),
                        help="stop a stage early after this many minutes (the log says so)")
    parser.add_argument("--max-shard-mb", type=float, help="shard weight files above this size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from jinbetween.conversion import VAE_COMPONENT, save_model_folder
    from jinbetween.pipeline import Pipeline
    from jinbetween.toyworld.bench import contact_sheet

    args.out.mkdir(parents=True, exist_ok=True)
    shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    limits = [m * 60 for m in args.minutes] if args.minutes else [None, None]
    with open(args.out / "train_log.jsonl", "a") as log_file:
        def on_log(record: dict) -> None:
            log.info(json.dumps(record))
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        start = time.perf_counter()
        pool = jnp.asarray(render_pool(world.split_seeds("train", args.videos)))
        on_log({"stage": "pool", "videos": args.videos, "seconds": round(time.perf_counter() - start, 2)})
        held_out = np.stack([world.video(s) for s in world.split_seeds("validation", 4)])
        if args.vae:
            vae = VAE.from_pretrained(args.vae, dtype=jnp.float32)
        else:
            init_vae = VAE.from_pretrained(args.vae_resume, dtype=jnp.float32) if args.vae_resume else None
            vae_cfg = VAETrainConfig(steps=args.vae_steps, batch_clips=args.vae_batch)
            vae = train_vae(pool, vae_cfg, args.seed, on_log, time_limit=limits[0],
                            init=init_vae)
            save_model_folder(vae, args.out / "vae", VAE_COMPONENT, max_shard_bytes=shard)
        decoded = np.stack([np.asarray(vae.decode_video(vae.config.scaling_factor * vae.encode(_pixels(v))))
                            for v in held_out])
        reconstructed = np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
        psnr = -10 * np.log10(np.mean((reconstructed / 255 - held_out / 255) ** 2))
        on_log({"stage": "vae", "scaling_factor": vae.config.scaling_factor, "validation_psnr": float(psnr)})
        contact_sheet(_paired("reconstructed", held_out, reconstructed), every=2).save(
            args.out / "vae_reconstructions.png")
        if args.unet_steps == 0:
            return
        init = None
        if args.resume:
            init = Trainables(UNet.from_pretrained(args.resume, dtype=jnp.float32),
                              ImageEncoder.from_pretrained(args.resume, dtype=jnp.float32))
        unet_cfg = UNetTrainConfig(steps=args.unet_steps, batch_size=args.batch_size, schedule=args.unet_schedule)
        trained = train_unet(vae, pool, unet_cfg, args.seed + 1, on_log, init=init, time_limit=limits[1])
        pipeline = Pipeline(trained.unet, vae, trained.image_encoder,
                            default_size=(world.WorldConfig.height, world.WorldConfig.width))
        pipeline.save_pretrained(args.out / "pipeline", dtype=jnp.dtype(args.save_dtype), max_shard_bytes=shard)
        samples = pipeline.image_to_video(list(held_out[:, 0]), key=jax.random.key(args.seed))
        contact_sheet(_paired("sampled", held_out, samples), every=2).save(args.out / "i2v_samples.png")
        on_log({"stage": "done", "seconds": round(time.perf_counter() - start, 2)})


if __name__ == "__main__":
    main()
