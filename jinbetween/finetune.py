"""GI backward-motion fine-tune (Algorithm 1 of Generative Inbetweening): train the temporal W_v/W_o delta.

The trainable parameters *are* the backward delta of `jinbetween.models.delta`: float32 master values for the
`to_v.weight`/`to_out.0.weight` of every temporal `attn1`, added to the frozen base UNet inside the
jitted step. One step, for a clip already reversed in time (latents z):

    ln σ ~ N(p_mean, p_std²) per clip;  z_t = z + σ·ε
    maps = frozen base UNet on [c_in·flip_t(z_t) ; reference latent], captured, no gradient
    v    = (base + Δ) UNet on [c_in·z_t ; cond latent], temporal attn1 using rot180(maps)
    loss = mean(((1 + σ²)/σ²)·(denoised(z_t, v, σ) − z)²),  AdamW on Δ after global-norm clipping

`train_step` is a pure function of (UNet state, TrainState, ClipBatch, key, static TrainConfig); `encode_clips`
turns video clips into a ClipBatch; `finetune` is the resumable loop around them (orbax checkpoints, JSONL loss log,
loss-curve PNG, the trained delta exported for `Pipeline` / `jinbetween interpolate --method gi`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Collection, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageDraw

from jinbetween import atomic, checks, conditioning
from jinbetween.checkpoint import TrainingCheckpoints
from jinbetween.conditioning import Conditioning
from jinbetween.config import UNetConfig
from jinbetween.denoiser import denoised, edm_loss, flip_time, paired_velocity
from jinbetween.errors import ConfigError, DivergedError
from jinbetween.models.delta import Delta, delta_keys, delta_shapes, with_delta
from jinbetween.models.naming import torch_key
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet, high_res_blocks, temporal_attention_layers
from jinbetween.weights.delta import BACKWARD_DELTA, save_delta

log = logging.getLogger(__name__)


REMAT_CHOICES = ("none", "high_res", "all")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and noise-level settings of the backward-motion fine-tune (defaults: GI's training script).

    remat: which of the trainable UNet's blocks recompute their activations in the backward pass instead of
    keeping them (`jax.checkpoint` per block): "none", "high_res" (the full-resolution down and up blocks:
    most of the memory, less of the compute) or "all".
    """

    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 1e-2
    eps: float = 1e-8
    clip_norm: float = 1.0
    p_mean: float = 0.7
    p_std: float = 1.6
    remat: str = "none"

    def __post_init__(self):
        checks.number(self.learning_rate, "learning_rate", "the learning rate", above=0, example=1e-4)
        checks.number(self.b1, "b1", "Adam's β1", minimum=0, maximum=0.999999, example=0.9)
        checks.number(self.b2, "b2", "Adam's β2", minimum=0, maximum=0.999999, example=0.999)
        checks.number(self.weight_decay, "weight_decay", "the weight decay", minimum=0, example=1e-2)
        checks.number(self.eps, "eps", "Adam's ε", above=0, example=1e-8)
        checks.number(self.clip_norm, "clip_norm", "the gradient clipping norm", above=0, example=1.0)
        checks.number(self.p_mean, "p_mean", "the mean log noise level", example=0.7)
        checks.number(self.p_std, "p_std", "the spread of log noise levels", above=0, example=1.6)
        checks.choice(self.remat, "remat", REMAT_CHOICES, "the rematerialized blocks")


# --------------------------------------------------------------------------------------------------
# Which parameters train.


class Rule(NamedTuple):
    """Parameters whose diffusers key matches `pattern` (re.fullmatch) are trained if `trained`, else frozen."""

    name: str
    pattern: str
    trained: bool


def trainable_rules(cfg: UNetConfig) -> tuple[Rule, ...]:
    """Returns the rules of GI's fine-tune: temporal attn1 W_v and W_o train, every other parameter is frozen."""
    layers = "|".join(re.escape(layer) for layer in temporal_attention_layers(cfg))
    trained = rf"({layers})\.(to_v|to_out\.0)\.weight"
    return (Rule("temporal attn1 W_v/W_o", trained, trained=True),
            Rule("everything else", rf"(?!{trained}$).*", trained=False))


def select_trainable(unet: ModelState[UNet], rules: Sequence[Rule] | None = None) -> tuple[str, ...]:
    """Returns the diffusers keys of the trained parameters, in `delta_keys` order.

    Raises ConfigError unless every parameter matches exactly one rule and the trained set is exactly
    the backward delta's keys (a silent gap would train, or freeze, the wrong weights).
    """
    cfg = unet.merge().config
    rules = trainable_rules(cfg) if rules is None else tuple(rules)
    keys = [torch_key(path) for path, _ in nnx.to_flat_state(unet.state)]
    matches = {key: [r for r in rules if re.fullmatch(r.pattern, key)] for key in keys}
    unmatched = sorted(k for k, m in matches.items() if not m)
    multiple = sorted(f"{k} ({', '.join(r.name for r in m)})" for k, m in matches.items() if len(m) > 1)
    if unmatched or multiple:
        raise ConfigError(f"Trainable rules must match every UNet parameter exactly once: unmatched "
                          f"{unmatched or 'none'}; matched more than once {multiple or 'none'}. Fix the patterns.")
    trained = {k for k, m in matches.items() if m[0].trained}
    expected = delta_keys(cfg)
    if trained != set(expected):
        raise ConfigError(f"The trained parameters must be exactly the backward delta's {len(expected)} keys; "
                          f"missing {sorted(set(expected) - trained) or 'none'}, extra "
                          f"{sorted(trained - set(expected)) or 'none'}.")
    return expected


# --------------------------------------------------------------------------------------------------
# State and batch.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """delta: {diffusers key: float32 `[in, out]`}, the trained values; opt_state: optax state over delta only."""

    delta: dict[str, jax.Array]
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClipBatch:
    """A batch of training clips, each already reversed in time.

    latents: `[B, F, h, w, C]` scaling_factor × VAE latents of the reversed clip.
    cond: the conditioning image (the clip's last original frame = first reversed frame), batch B.
    reference: the frozen forward model's image (the first original frame), batch B.
    """

    latents: jax.Array
    cond: Conditioning
    reference: Conditioning


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Returns global-norm clipping followed by AdamW (decoupled weight decay on the params passed to update)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


def init_train_state(unet: ModelState[UNet], cfg: TrainConfig) -> TrainState:
    """Returns step 0: a zero float32 delta on the trained keys and a fresh optimizer state over it."""
    keys = select_trainable(unet)
    shapes = delta_shapes(unet.merge().config)
    delta = {key: jnp.zeros(shapes[key], jnp.float32) for key in keys}
    return TrainState(delta=delta, opt_state=optimizer(cfg).init(delta), step=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------------
# The loss and the step.


def draw_noise(key: jax.Array, shape: tuple[int, ...], cfg: TrainConfig) -> tuple[jax.Array, jax.Array]:
    """Returns (σ `[B]`, ε `[B, F, h, w, C]`) for latents of `shape`; clip b's draws come from fold_in(key, b)."""

    def one(index):
        sigma_key, eps_key = jax.random.split(jax.random.fold_in(key, index))
        log_sigma = cfg.p_mean + cfg.p_std * jax.random.normal(sigma_key, (), jnp.float32)
        return jnp.exp(log_sigma), jax.random.normal(eps_key, shape[1:], jnp.float32)

    return jax.vmap(one)(jnp.arange(shape[0]))


def backward_loss(delta: Delta, unet: ModelState[UNet], batch: ClipBatch, sigma: jax.Array, eps: jax.Array,
                  remat: bool | Collection[str] = False) -> jax.Array:
    """Returns the EDM-weighted x0 loss (scalar) of the backward model base + `delta` on `batch`.

    sigma: `[B]`, eps: `[B, F, h, w, C]`. The frozen forward pass (base weights) on the clip in original order only
    supplies the rotated attention maps and passes no gradient: differentiate w.r.t. `delta`.
    """
    z = batch.latents
    z_t = z + sigma[:, None, None, None, None] * eps
    _, v = paired_velocity(unet, with_delta(unet, delta), flip_time(z_t), sigma, batch.reference, batch.cond,
                           remat=remat)
    loss, _ = edm_loss(denoised(z_t, v, sigma[:, None, None, None, None]), z, sigma)
    return loss


def _decay_targets(unet: ModelState[UNet], delta: Delta) -> dict[str, jax.Array]:
    """The full trained weights base + Δ (float32): GI's AdamW decays W itself, not the delta."""
    state = {torch_key(path): var for path, var in nnx.to_flat_state(unet.state)}
    return {key: state[key].get_value().astype(jnp.float32) + value for key, value in delta.items()}


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("train_state",))
def train_step(unet: ModelState[UNet], train_state: TrainState, batch: ClipBatch, key: jax.Array,
               cfg: TrainConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """Returns (the next TrainState, metrics {loss, grad_norm (before clipping), sigma_mean}) after one step.

    unet: the frozen base UNet (any dtype; never differentiated). batch: B reversed clips. key: this step's key.
    """
    chex.assert_rank(batch.latents, 5)
    sigma, eps = draw_noise(key, batch.latents.shape, cfg)
    remat = {"none": False, "all": True, "high_res": high_res_blocks(unet.merge().config)}[cfg.remat]
    loss, grads = jax.value_and_grad(backward_loss)(train_state.delta, unet, batch, sigma, eps, remat)
    updates, opt_state = optimizer(cfg).update(grads, train_state.opt_state,
                                               _decay_targets(unet, train_state.delta))
    delta = optax.apply_updates(train_state.delta, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "sigma_mean": jnp.mean(sigma)}
    return TrainState(delta=delta, opt_state=opt_state, step=train_state.step + 1), metrics


# --------------------------------------------------------------------------------------------------
# From video clips to a batch.


@functools.partial(jax.jit, static_argnames=("noise_aug_strength",))
def encode_clips(vae: ModelState, image_encoder: ModelState, pixels: jax.Array, clip_input: jax.Array,
                 time_ids: jax.Array, key: jax.Array, noise_aug_strength: float) -> ClipBatch:
    """Returns the ClipBatch of clips in original time order, as GI's training script builds it.

    pixels: `[B, F, H, W, 3]` in [-1, 1]; clip_input: `[2B, S, S, 3]` CLIP input of the clips' last frames then
    their first frames (`conditioning.clip_pixels`); time_ids: `[3]`. The conditioning image (last original
    frame) and the reference image (first) share one augmentation noise draw; the clip latents are
    scaling_factor × posterior samples of the reversed clip.
    """
    vae_model, encoder = vae.merge(), image_encoder.merge()
    b = pixels.shape[0]
    aug_key, sample_key = jax.random.split(key)
    reversed_pixels = pixels[:, ::-1]
    keyframes = jnp.concatenate([reversed_pixels[:, 0], pixels[:, 0]])  # [cond…, reference…]
    aug_noise = jnp.tile(jax.random.normal(aug_key, (b, *keyframes.shape[1:])), (2, 1, 1, 1))
    image_latents = vae_model.encode(keyframes + noise_aug_strength * aug_noise)
    embeds = encoder(clip_input)[:, None, :]

    def clip_latents(args):
        frames, clip_key = args
        return vae_model.config.scaling_factor * vae_model.encode_sample(frames, clip_key)

    latents = jax.lax.map(clip_latents, (reversed_pixels, jax.random.split(sample_key, b)))
    time_ids = jnp.broadcast_to(time_ids, (b, time_ids.shape[-1]))
    halves = [slice(0, b), slice(b, 2 * b)]  # the conditioning images, then the reference images
    # clean_latent only serves the samplers' endpoint pins: training has none.
    cond, reference = (Conditioning(image_embeds=embeds[h], image_latent=image_latents[h], clean_latent=None,
                                    added_time_ids=time_ids) for h in halves)
    return ClipBatch(latents=latents.astype(jnp.float32), cond=cond, reference=reference)


def clip_batch(pipeline, frames: np.ndarray, time_ids: jax.Array, key: jax.Array,
               noise_aug_strength: float) -> ClipBatch:
    """Returns the ClipBatch of uint8 clips `[B, F, H, W, 3]` in original time order, encoded by `pipeline`'s VAE
    and image encoder (`encode_clips`), with the CLIP input of their last and first frames made on the host."""
    frames = np.asarray(frames)
    keyframes = np.concatenate([frames[:, -1], frames[:, 0]])
    clip_input = conditioning.clip_pixels(keyframes, pipeline.image_encoder.config.image_size, pipeline.clip_mean,
                                          pipeline.clip_std)
    return encode_clips(ModelState.of(pipeline.vae), ModelState.of(pipeline.image_encoder),
                        conditioning.vae_pixels(frames), clip_input, time_ids, key, noise_aug_strength)


# --------------------------------------------------------------------------------------------------
# The resumable loop.


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A fine-tune run around the step: its length, batch, seed, checkpoint cadence and the conditioning
    GI trained with (time ids [fps − 1, motion bucket, noise augmentation] = [6, 127, 0.02])."""

    steps: int
    batch_size: int = 1
    seed: int = 0
    save_every: int = 500
    keep: int = 3
    fps: float = 7
    motion_bucket_id: float = 127
    noise_aug_strength: float = 0.02
    prefetch: int = 2

    def __post_init__(self):
        for name in ("steps", "batch_size", "save_every", "keep"):
            checks.integer(getattr(self, name), name, name.replace("_", " "), minimum=1, example=1)
        checks.integer(self.prefetch, "prefetch", "the batches read ahead", minimum=0, example=2)
        checks.seed(self.seed, "seed")
        checks.number(self.fps, "fps", "the frame rate", above=0, example=7)
        checks.number(self.motion_bucket_id, "motion_bucket_id", "the motion bucket", minimum=0, example=127)
        checks.number(self.noise_aug_strength, "noise_aug_strength", "the keyframe noise level", minimum=0,
                      example=0.02)


LOG_FILE, LOSS_PLOT, CHECKPOINTS = "loss.jsonl", "loss.png", "checkpoints"


def _train_state_tree(state: TrainState) -> dict:
    """The TrainState as nested dicts with string keys, the form the checkpoint stores."""
    return {"delta": state.delta, "opt_state": {f"{i:04d}": leaf for i, leaf in enumerate(jax.tree.leaves(
        state.opt_state))}, "step": state.step}


def _train_state_from_tree(tree: dict, like: TrainState) -> TrainState:
    opt_leaves = [tree["opt_state"][k] for k in sorted(tree["opt_state"])]
    return TrainState(delta=tree["delta"], opt_state=jax.tree.unflatten(jax.tree.structure(like.opt_state), opt_leaves),
                      step=tree["step"])


def _run_identity(dataset, run: RunConfig, train: TrainConfig) -> dict:
    """What must not change between a run and its resumption for it to continue exactly (not its length)."""
    return {"seed": run.seed, "batch_size": run.batch_size, "videos": dataset.fingerprint,
            "train": dataclasses.asdict(train), "time_ids": [run.fps, run.motion_bucket_id, run.noise_aug_strength]}


def check_run_dir(out_dir: str | os.PathLike, resume: bool) -> None:
    """Raises ConfigError if `out_dir` already holds a run's checkpoints and `resume` is off (checked before any
    model loads; `finetune` checks it again)."""
    folder = Path(out_dir) / CHECKPOINTS
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    if steps and not resume:
        raise ConfigError(f"{out_dir} already holds fine-tune checkpoints up to step {steps[-1]}; pass --resume "
                          "(resume=True) to continue that run, or choose a new output dir.")


def _read_log(path: Path, up_to_step: int) -> list[dict]:
    """The logged steps 1..up_to_step (a crash after the last checkpoint leaves later lines, redone on resume; a
    crash while a line was appended leaves it cut short, so a last line that is not JSON is dropped too)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ConfigError(f"{path} line {number} is not JSON ({err.msg}); remove that line, or start the run "
                                  "in a new output dir.") from err
    return [r for r in records if r["step"] <= up_to_step]


def finetune(pipeline, dataset, out_dir: str | os.PathLike, run: RunConfig, train: TrainConfig = TrainConfig(), *,
             resume: bool = False, base_name: str | None = None,
             on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Trains a GI backward delta on `pipeline`'s UNet (the base) with clips of `dataset`; returns the delta's path.

    Writes into `out_dir`: `checkpoints/` every `run.save_every` steps and at the end (orbax; TrainState, data
    position, run identity), `loss.jsonl` (one line per step), `loss.png`, and the trained delta as
    `gi_backward/` (loadable with `Pipeline.load_backward_delta` or `jinbetween interpolate --backward-delta`).
    `resume=True` continues from the newest checkpoint exactly as if the run had not stopped; without it an
    `out_dir` that already holds checkpoints is refused. `base_name` (e.g. the weights dir) is recorded in the
    delta's metadata: the delta belongs to that base. `on_step(step, metrics)` is called after every step.
    """
    from jinbetween.data import ClipLoader

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet = ModelState.of(pipeline.unet)
    identity = _run_identity(dataset, run, train)
    state, position, first_step = init_train_state(unet, train), 0, 0
    with TrainingCheckpoints(out_dir / CHECKPOINTS, keep=run.keep) as checkpoints:
        latest = checkpoints.latest_step()
        if latest is not None and not resume:
            raise ConfigError(f"{out_dir} already holds fine-tune checkpoints up to step {latest}; pass --resume "
                              "(resume=True) to continue that run, or choose a new output dir.")
        if latest is not None:
            tree, record = checkpoints.restore(latest, _train_state_tree(jax.eval_shape(lambda: state)))
            if record["identity"] != identity:
                changed = sorted(k for k in identity if record["identity"].get(k) != identity[k])
                raise ConfigError(f"Cannot resume {out_dir}: the run's {', '.join(changed)} differ from the "
                                  "checkpoint's; resume with the same videos and settings, or start a new output dir.")
            state, position, first_step = _train_state_from_tree(tree, state), record["data_position"], latest
            log.info("resuming %s at step %d", out_dir, latest)
        if first_step >= run.steps:
            log.info("%s is already at step %d of %d", out_dir, first_step, run.steps)
        records = _read_log(out_dir / LOG_FILE, first_step)
        atomic.write_text(out_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in records))
        root = jax.random.key(run.seed)
        time_ids = conditioning.added_time_ids(run.fps, run.motion_bucket_id, run.noise_aug_strength)
        with ClipLoader(dataset, run.batch_size, seed=run.seed, start=position, prefetch=run.prefetch) as loader, \
                (out_dir / LOG_FILE).open("a") as log_file:
            for step in range(first_step, run.steps):
                start = time.perf_counter()
                clips = next(loader)
                encode_key, noise_key = jax.random.split(jax.random.fold_in(root, step))
                batch = clip_batch(pipeline, clips.frames, time_ids, encode_key, run.noise_aug_strength)
                state, metrics = train_step(unet, state, batch, noise_key, train)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(np.isfinite(v) for v in metrics.values()):
                    raise DivergedError(
                        f"The fine-tune diverged at step {step + 1} (loss {metrics['loss']:.4g}, gradient norm "
                        f"{metrics['grad_norm']:.4g}); that state was not saved: lower --lr (learning_rate), or "
                        f"resume from the last checkpoint ({checkpoints.latest_step() or 'none'}).", step + 1)
                record = {"step": step + 1, **metrics, "seconds": round(time.perf_counter() - start, 4),
                          "clips": [[str(path), int(first)] for path, first in clips.sources]}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                records.append(record)
                if (step + 1) % run.save_every == 0 or step + 1 == run.steps:
                    checkpoints.save(step + 1, _train_state_tree(state),
                                     {"data_position": loader.position, "identity": identity})
                if on_step is not None:
                    on_step(step + 1, metrics)
    write_loss_curve(records, out_dir / LOSS_PLOT)
    return save_delta(out_dir / BACKWARD_DELTA, jax.device_get(state.delta), unet.merge().config,
                      trained_steps=int(state.step), base=base_name,
                      run=dataclasses.asdict(run), train=dataclasses.asdict(train))


def write_loss_curve(records: Sequence[dict], path: str | os.PathLike, size: tuple[int, int] = (640, 360)) -> Path:
    """Draws the logged losses (log scale: dots per step, a line for their running mean) into a PNG at `path`."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 16, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    steps = np.array([r["step"] for r in records], np.float64)
    losses = np.log10(np.maximum([r["loss"] for r in records], 1e-12)) if records else np.zeros(0)
    if len(steps):
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        low, high = losses.min(), max(losses.max(), losses.min() + 1e-6)
        x_of = lambda s: left + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (right - left)
        y_of = lambda v: bottom - (v - low) / (high - low) * (bottom - top)
        for s, v in zip(steps, losses):
            draw.point((x_of(s), y_of(v)), fill=(150, 170, 230))
        if len(smooth) > 1:
            draw.line([(x_of(s), y_of(v)) for s, v in zip(steps[window - 1:], smooth)], fill=(200, 40, 40), width=2)
        for v in (low, high):
            draw.text((4, y_of(v) - 6), f"{10 ** v:.3g}", fill="black")
        draw.text((left, bottom + 8), f"step {int(steps[0])}", fill="black")
        draw.text((right - 80, bottom + 8), f"step {int(steps[-1])}", fill="black")
    draw.text((left + 8, top + 4), "fine-tune loss (log scale; red: running mean)", fill="black")
    with atomic.replacing(path) as temporary:
        image.save(temporary)
    return Path(path)
