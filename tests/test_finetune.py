"""GI backward-motion fine-tune step: trainable-rule coverage, gradients only into the delta, FD check, determinism."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jinbetween import config
from jinbetween.conditioning import Conditioning
from jinbetween.errors import ConfigError
from jinbetween.finetune import (ClipBatch, Rule, TrainConfig, backward_loss, draw_noise, init_train_state,
                                 select_trainable, train_step, trainable_rules)
from jinbetween.models.delta import delta_keys, delta_shapes, with_delta
from jinbetween.models.naming import torch_key
from jinbetween.models.state import ModelState
from jinbetween.models.unet import abstract_unet, temporal_attention_layers

CFG = config.tiny()
FRAMES, SIZE, BATCH = 3, 8, 2
# One optimizer config for every step test, so the step compiles once; lr large enough to move in a few steps.
TRAIN = TrainConfig(learning_rate=1e-2)
# Base weights a gradient test perturbs: the trained ones and the temporal attn1 W_q/W_k that make the maps.
PROBED = delta_keys(CFG) + tuple(f"{layer}.{leaf}" for layer in temporal_attention_layers(CFG)
                                 for leaf in ("to_q.weight", "to_k.weight"))


@jax.jit
@chex.assert_max_traces(n=1)
def loss_and_grads(delta, unet, batch, sigma, eps):
    """(loss, (d loss/d delta, d loss/d base weights at PROBED)), compiled once for all the gradient tests; chex
    fails if a call with new arrays of the same shapes traces it again."""
    def loss(delta, base_shift):
        return backward_loss(delta, with_delta(unet, base_shift), batch, sigma, eps)

    base = {torch_key(path): v.get_value() for path, v in nnx.to_flat_state(unet.state)}
    return jax.value_and_grad(loss, argnums=(0, 1))(delta, {k: jnp.zeros_like(base[k]) for k in PROBED})


@pytest.fixture(scope="module")
def unet():
    """The tiny UNet with random weights drawn in numpy: `UNet(CFG, rngs=...)` spends ~15 s in eager jax.random
    on a 2-core machine, a quarter of this file's budget. Kernels N(0, 1/fan_in) like NNX's default; biases,
    norm scales and mix factors are perturbed from their usual 0 / 1 / 0.5 so that none is a trivial constant."""
    rng = np.random.default_rng(0)
    centre = {"kernel": 0.0, "bias": 0.0, "scale": 1.0, "mix_factor": 0.5}
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(abstract_unet(CFG))):
        leaf, shape = str(path[-1]), var.get_value().shape
        std = np.prod(shape[:-1]) ** -0.5 if leaf == "kernel" else 0.05
        value = centre[leaf] + std * rng.standard_normal(shape)
        flat.append((path, var.replace(value=jnp.asarray(value, jnp.float32))))
    return ModelState(nnx.graphdef(abstract_unet(CFG)), nnx.from_flat_state(flat))


def conditioning(key, batch: int) -> Conditioning:
    k1, k2, k3 = jax.random.split(key, 3)
    return Conditioning(
        image_embeds=jax.random.normal(k1, (batch, 1, CFG.cross_attention_dim[0])),
        image_latent=jax.random.normal(k2, (batch, SIZE, SIZE, CFG.out_channels)),
        clean_latent=jax.random.normal(k3, (batch, SIZE, SIZE, CFG.out_channels)),
        added_time_ids=jnp.tile(jnp.array([[6.0, 127.0, 0.02]]), (batch, 1)),
    )


def clip_batch(seed: int = 0) -> ClipBatch:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return ClipBatch(latents=jax.random.normal(k1, (BATCH, FRAMES, SIZE, SIZE, CFG.out_channels)),
                     cond=conditioning(k2, BATCH), reference=conditioning(k3, BATCH))


def random_delta(key, scale: float) -> dict[str, jax.Array]:
    shapes = delta_shapes(CFG)
    return {k: scale * jax.random.normal(jax.random.fold_in(key, i), shapes[k]) for i, k in enumerate(delta_keys(CFG))}


def test_rules_match_every_parameter_once_and_train_exactly_the_delta_keys(unet):
    keys = [torch_key(path) for path, _ in nnx.to_flat_state(unet.state)]
    rules = trainable_rules(CFG)
    for key in keys:
        hits = [r.name for r in rules if re.fullmatch(r.pattern, key)]
        assert len(hits) == 1, f"{key} matched by {hits}"
    assert select_trainable(unet) == delta_keys(CFG)
    assert len(delta_keys(CFG)) == 8


def test_rules_that_leave_a_parameter_unmatched_raise_naming_it(unet):
    trained, frozen = trainable_rules(CFG)
    gap = Rule(frozen.name, rf"(?!conv_in\.)(?!{trained.pattern}$).*", trained=False)
    with pytest.raises(ConfigError, match=r"unmatched \['conv_in.bias', 'conv_in.weight'\]"):
        select_trainable(unet, (trained, gap))
    with pytest.raises(ConfigError, match="matched more than once.*attn1.to_v.weight"):
        select_trainable(unet, (trained, Rule("all", ".*", trained=False)))
    with pytest.raises(ConfigError, match="extra.*attn1.to_q.weight"):
        select_trainable(unet, (Rule("qv", trained.pattern.replace("to_v", "to_v|to_q"), True),
                                Rule("rest", rf"(?!{trained.pattern.replace('to_v', 'to_v|to_q')}$).*", False)))


def test_train_state_is_a_float32_zero_delta_with_optimizer_leaves_shaped_like_it(unet):
    state = init_train_state(unet, TRAIN)
    assert list(state.delta) == list(delta_keys(CFG))
    for key, value in state.delta.items():
        assert value.dtype == jnp.float32 and value.shape == delta_shapes(CFG)[key] and not value.any(), key
    shapes = {v.shape for v in state.delta.values()}
    for leaf in jax.tree.leaves(state.opt_state):
        assert leaf.shape in shapes | {()}, f"optimizer leaf of shape {leaf.shape} is not delta-shaped"
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert len(moments) == 2 * len(state.delta), "AdamW keeps two moments per delta tensor and nothing else"


def test_one_step_changes_only_the_delta_and_the_loss_decreases(unet):
    batch, key = clip_batch(), jax.random.key(1)
    state = init_train_state(unet, TRAIN)
    base_before = jax.tree.map(np.asarray, unet.state)
    losses = []
    for _ in range(8):
        state, metrics = train_step(unet, state, batch, key, TRAIN)
        losses.append(float(metrics["loss"]))
        assert np.isfinite(losses[-1]) and np.isfinite(float(metrics["grad_norm"])), metrics
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b), err_msg="base weights changed"),
                 base_before, unet.state)
    assert int(state.step) == 8
    assert all(np.abs(np.asarray(v)).max() > 0 for v in state.delta.values()), "some delta tensor never moved"
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], \
        f"loss on a fixed batch/key did not decrease steadily: {losses}"


def unit(tree):
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in tree.values()))
    return {k: x / norm for k, x in tree.items()}


def test_gradient_matches_central_differences_along_a_random_direction(unet):
    batch = clip_batch(2)
    sigma, eps = draw_noise(jax.random.key(3), batch.latents.shape, TRAIN)
    delta = random_delta(jax.random.key(4), 0.05)
    _, (grad, _) = loss_and_grads(delta, unet, batch, sigma, eps)
    # A purely random unit direction in this ~10⁴-dim space sees ~|g|/√n ≈ 5e-4 of |g| ≈ 0.09, too little for float32
    # central differences on a loss of ~1.3 (a 1e-5 error floor); half gradient, half random perturbs every tensor
    # randomly while the directional derivative (~0.06) stays measurable.
    noise = unit(random_delta(jax.random.key(5), 1.0))
    direction = unit({k: unit(grad)[k] + noise[k] for k in delta})
    analytic = float(sum(jnp.vdot(grad[k], direction[k]) for k in delta))
    h = 3e-2
    shifted = [float(loss_and_grads({k: delta[k] + s * h * direction[k] for k in delta}, unet, batch, sigma, eps)[0])
               for s in (1, -1)]
    numeric = (shifted[0] - shifted[1]) / (2 * h)
    # Measured relative error against h: 2e-3 at 3e-3 (float32 rounding of the loss, ~1e-7·1.3 per evaluation,
    # over 2h), a 1.3e-4 plateau at 1e-2..3e-2, 1.4e-3 at 0.3 (O(h²) truncation). 1e-3 is ~8x above the plateau.
    rel = abs(analytic - numeric) / abs(numeric)
    assert rel < 1e-3, f"gradient·d = {analytic:.6g} vs finite difference {numeric:.6g} (rel {rel:.2e})"


def test_frozen_forward_pass_passes_no_gradient(unet):
    """d loss/d base at the delta keys equals d loss/d delta, and the injected layers' W_q/W_k get exactly 0.

    If the captured maps were not stop-gradient'ed, the forward pass would add gradient to W_q/W_k of the
    temporal attn1 layers (they make the maps) and to W_v/W_o (earlier layers shape later maps).
    """
    batch = clip_batch(4)
    sigma, eps = draw_noise(jax.random.key(6), batch.latents.shape, TRAIN)
    delta = random_delta(jax.random.key(7), 0.05)
    _, (grad_delta, grad_base) = loss_and_grads(delta, unet, batch, sigma, eps)
    assert jax.tree.structure(grad_delta) == jax.tree.structure(delta)
    by_key = {k: np.asarray(v) for k, v in grad_base.items()}
    for key in delta_keys(CFG):
        np.testing.assert_allclose(by_key[key], grad_delta[key], rtol=1e-5, atol=1e-7,
                                   err_msg=f"{key}: base gradient differs from the delta gradient")
    for layer in unet.merge().temporal_attention_layers:
        for leaf in ("to_q.weight", "to_k.weight"):
            assert not by_key[f"{layer}.{leaf}"].any(), f"{layer}.{leaf} received gradient from the frozen pass"


def test_same_key_gives_the_same_step_and_new_arrays_do_not_retrace(unet):
    """train_step is jitted with donation in the library, so its traces are counted by its jit cache."""
    def step(seed):
        return train_step(unet, init_train_state(unet, TRAIN), clip_batch(seed), jax.random.key(seed), TRAIN)

    s0, m0 = step(0)
    compiled = train_step._cache_size()
    (s1, m1), (_, m2) = step(0), step(1)
    assert train_step._cache_size() == compiled, "train_step traced again for new arrays of the same shapes"
    chex.assert_trees_all_equal((s0, m0), (s1, m1))
    assert float(m0["loss"]) != float(m2["loss"]), "a new batch and key gave the identical loss"
