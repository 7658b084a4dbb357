"""GI backward-motion fine-tune (Algorithm 1 of Generative Inbetweening): train the temporal W_v/W_o delta.

The trainable parameters *are* the backward delta of `jinbetween.delta`: float32 master values for the
`to_v.weight`/`to_out.0.weight` of every temporal `attn1`, added to the frozen base UNet inside the
jitted step. One step, for a clip already reversed in time (latents z):

    ln σ ~ N(p_mean, p_std²) per clip;  z_t = z + σ·ε
    maps = frozen base UNet on [c_in·flip_t(z_t) ; reference latent], captured, no gradient
    v    = (base + Δ) UNet on [c_in·z_t ; cond latent], temporal attn1 using rot180(maps)
    loss = mean(((1 + σ²)/σ²)·(denoised(z_t, v, σ) − z)²),  AdamW on Δ after global-norm clipping

`train_step` is a pure function of (UNet state, TrainState, ClipBatch, key, static TrainConfig).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jinbetween import schedule
from jinbetween.conditioning import Conditioning
from jinbetween.config import UNetConfig
from jinbetween.conversion import torch_key
from jinbetween.delta import Delta, delta_keys, delta_shapes, with_delta
from jinbetween.errors import ConfigError
from jinbetween.models.attention import AttnControl, rot180
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet
from jinbetween.samplers.core import flip_time, unet_velocity


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and noise-level settings of the backward-motion fine-tune (defaults: GI's training script).

    remat: recompute the trainable UNet's activations in the backward pass (`jax.checkpoint`), trading
    compute for memory at full resolution.
    """

    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 1e-2
    eps: float = 1e-8
    clip_norm: float = 1.0
    p_mean: float = 0.7
    p_std: float = 1.6
    remat: bool = False


# --------------------------------------------------------------------------------------------------
# Which parameters train.


class Rule(NamedTuple):
    """Parameters whose diffusers key matches `pattern` (re.fullmatch) are trained if `trained`, else frozen."""

    name: str
    pattern: str
    trained: bool


_TEMPORAL_ATTN1 = (r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+"
                   r"\.temporal_transformer_blocks\.\d+\.attn1")
_TRAINED_KEY = _TEMPORAL_ATTN1 + r"\.(to_v|to_out\.0)\.weight"


def trainable_rules(cfg: UNetConfig) -> tuple[Rule, ...]:
    """Returns the rules of GI's fine-tune: temporal attn1 W_v and W_o train, every other parameter is frozen.

    `cfg` is accepted so that rule sets may depend on the architecture; GI's rules do not.
    """
    del cfg
    return (Rule("temporal attn1 W_v/W_o", _TRAINED_KEY, trained=True),
            Rule("everything else", rf"(?!{_TRAINED_KEY}$).*", trained=False))


def _param_keys(unet: ModelState[UNet]) -> dict[str, tuple]:
    return {torch_key(path): path for path, _ in nnx.to_flat_state(unet.state)}


def select_trainable(unet: ModelState[UNet], rules: Sequence[Rule] | None = None) -> tuple[str, ...]:
    """Returns the diffusers keys of the trained parameters, in `delta_keys` order.

    Raises ConfigError unless every parameter matches exactly one rule and the trained set is exactly
    the backward delta's keys (a silent gap would train, or freeze, the wrong weights).
    """
    cfg = unet.merge().config
    rules = trainable_rules(cfg) if rules is None else tuple(rules)
    matches = {key: [r for r in rules if re.fullmatch(r.pattern, key)] for key in _param_keys(unet)}
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
                  remat: bool = False) -> jax.Array:
    """Returns the EDM-weighted x0 loss (scalar) of the backward model base + `delta` on `batch`.

    sigma: `[B]`, eps: `[B, F, h, w, C]`. The frozen forward pass (base weights) only supplies the
    rotated attention maps and passes no gradient: differentiate w.r.t. `delta`.
    """
    z = batch.latents
    z_t = z + sigma[:, None, None, None, None] * eps
    _, maps = unet_velocity(unet, flip_time(z_t), sigma, batch.reference, guided=False, attn=AttnControl.capture())
    maps = jax.lax.stop_gradient(rot180(maps))

    def trainable_velocity(delta):
        return unet_velocity(with_delta(unet, delta), z_t, sigma, batch.cond, guided=False,
                             attn=AttnControl.inject(maps))

    v = (jax.checkpoint(trainable_velocity) if remat else trainable_velocity)(delta)
    sigma_ = sigma[:, None, None, None, None]
    weight = (1 + sigma_**2) / sigma_**2
    return jnp.mean(weight * (schedule.denoised(z_t, v, sigma_) - z) ** 2)


def _decay_targets(unet: ModelState[UNet], delta: Delta) -> dict[str, jax.Array]:
    """The full trained weights base + Δ (float32): GI's AdamW decays W itself, not the delta."""
    paths = _param_keys(unet)
    state = dict(nnx.to_flat_state(unet.state))
    return {key: state[paths[key]].get_value().astype(jnp.float32) + value for key, value in delta.items()}


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("train_state",))
def train_step(unet: ModelState[UNet], train_state: TrainState, batch: ClipBatch, key: jax.Array,
               cfg: TrainConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """Returns (the next TrainState, metrics {loss, grad_norm (before clipping), sigma_mean}) after one step.

    unet: the frozen base UNet (any dtype; never differentiated). batch: B reversed clips. key: this step's key.
    """
    chex.assert_rank(batch.latents, 5)
    sigma, eps = draw_noise(key, batch.latents.shape, cfg)
    loss, grads = jax.value_and_grad(backward_loss)(train_state.delta, unet, batch, sigma, eps, cfg.remat)
    updates, opt_state = optimizer(cfg).update(grads, train_state.opt_state,
                                               _decay_targets(unet, train_state.delta))
    delta = optax.apply_updates(train_state.delta, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "sigma_mean": jnp.mean(sigma)}
    return TrainState(delta=delta, opt_state=opt_state, step=train_state.step + 1), metrics
